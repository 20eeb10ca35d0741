// Command pause is the node's pod sandbox ("pause") container: the process
// that holds a pod's namespaces. It does what Kubernetes' pause.c does:
// sleep until SIGINT/SIGTERM, and reap orphaned children (it is PID 1 of the
// pod when the pod shares one PID namespace). Static Go, standard library
// only, so it builds offline; hack/testbed/node.py packs it as an OCI image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		os.Stdout.WriteString("pause (gitopsd test bed)\n")
		return
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range sigs {
		if sig == syscall.SIGCHLD {
			for {
				var ws syscall.WaitStatus
				pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
