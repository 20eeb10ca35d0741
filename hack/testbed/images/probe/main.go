// Command probe is the test image of tests/test_testbed_node.py: a pod that
// talks to the apiserver exactly as an in-cluster client does.
//
// At start it reads the ServiceAccount token and CA that the kubelet mounts at
// /var/run/secrets/kubernetes.io/serviceaccount, and calls
// https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT (the `kubernetes`
// Service's ClusterIP, which the kubelet puts in every container's
// environment): GET /version, then POST a SelfSubjectReview, which answers
// with the user name the apiserver authenticated the token as. It logs one
// line per result (the test reads them with `kubectl logs`) and serves
// /healthz on :8080 only once both calls succeeded, so the pod's readiness
// probe proves them too. With PROBE_URL set it also GETs that URL (a
// service of the host that node.expose() made reachable) and logs the
// answer before it turns ready. Standard library only: it builds offline.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"
)

const saDir = "/var/run/secrets/kubernetes.io/serviceaccount"

func logf(format string, args ...any) {
	fmt.Printf(time.Now().UTC().Format(time.RFC3339)+" "+format+"\n", args...)
}

func client() (*http.Client, string, error) {
	ca, err := os.ReadFile(saDir + "/ca.crt")
	if err != nil {
		return nil, "", err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, "", fmt.Errorf("no certificate in %s/ca.crt", saDir)
	}
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return nil, "", fmt.Errorf("KUBERNETES_SERVICE_HOST/PORT are not set")
	}
	c := &http.Client{Timeout: 10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	return c, "https://" + net.JoinHostPort(host, port), nil
}

func call(c *http.Client, method, url string, body []byte) ([]byte, error) {
	token, err := os.ReadFile(saDir + "/token") // re-read: the kubelet rotates it
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+string(bytes.TrimSpace(token)))
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return nil, fmt.Errorf("%s %s: %d %s", method, url, resp.StatusCode, bytes.TrimSpace(out))
	}
	return out, nil
}

func check() error {
	c, base, err := client()
	if err != nil {
		return err
	}
	out, err := call(c, "GET", base+"/version", nil)
	if err != nil {
		return err
	}
	var v struct{ GitVersion string }
	_ = json.Unmarshal(out, &v)
	logf("apiserver %s answered /version: gitVersion=%s", base, v.GitVersion)
	review := []byte(`{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}`)
	out, err = call(c, "POST", base+"/apis/authentication.k8s.io/v1/selfsubjectreviews", review)
	if err != nil {
		return err
	}
	var r struct {
		Status struct{ UserInfo struct{ Username string } }
	}
	_ = json.Unmarshal(out, &r)
	logf("SelfSubjectReview: authenticated as %s", r.Status.UserInfo.Username)
	if url := os.Getenv("PROBE_URL"); url != "" {
		resp, err := (&http.Client{Timeout: 10 * time.Second}).Get(url)
		if err != nil {
			return err
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET %s: %d", url, resp.StatusCode)
		}
		logf("GET %s: %d %s", url, resp.StatusCode, bytes.TrimSpace(body))
	}
	return nil
}

func main() {
	hostname, _ := os.Hostname()
	logf("probe starting in pod %s", hostname)
	var ready atomic.Bool
	http.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready.Load() {
			http.Error(w, "apiserver not reached yet", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "ok\n")
	})
	go func() {
		for {
			err := check()
			if err == nil {
				ready.Store(true)
				return
			}
			logf("apiserver check failed (retrying): %v", err)
			time.Sleep(time.Second)
		}
	}()
	srv := &http.Server{Addr: ":8080"}
	go func() {
		sigs := make(chan os.Signal, 1)
		signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
		<-sigs
		logf("probe stopping")
		srv.Close()
	}()
	if err := srv.ListenAndServe(); err != nil && err != http.ErrServerClosed {
		logf("serve: %v", err)
		os.Exit(1)
	}
}
