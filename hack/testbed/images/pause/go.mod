module gitopsd.local/testbed/pause

go 1.26.0
