module gitopsd.local/testbed/probe

go 1.26.0
