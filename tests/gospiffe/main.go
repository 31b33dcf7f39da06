// gospiffe-check validates an X.509-SVID with go-spiffe, a third-party SPIFFE
// implementation, the way a go-spiffe workload would validate a peer:
//
//	gospiffe-check CHAIN.pem BUNDLE.pem SPIFFE_ID [UNIX_TIME]
//
// CHAIN.pem holds the SVID leaf first, then any intermediates (a trailing root is
// harmless). BUNDLE.pem holds the X.509 authorities of the expected ID's trust domain.
// UNIX_TIME, if given, is the instant to verify at (default: now).
// On success it prints the verified SPIFFE ID and exits 0; otherwise it explains on
// stderr and exits 1 (2 for a usage or input error).
package main

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

func main() {
	if len(os.Args) != 4 && len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: gospiffe-check CHAIN.pem BUNDLE.pem SPIFFE_ID [UNIX_TIME]")
		os.Exit(2)
	}
	chainPath, bundlePath, want := os.Args[1], os.Args[2], os.Args[3]
	var opts []x509svid.VerifyOption
	if len(os.Args) == 5 {
		secs, err := strconv.ParseInt(os.Args[4], 10, 64)
		if err != nil {
			fail(2, "UNIX_TIME %q: %v", os.Args[4], err)
		}
		opts = append(opts, x509svid.WithTime(time.Unix(secs, 0)))
	}

	expected, err := spiffeid.FromString(want)
	if err != nil {
		fail(2, "expected SPIFFE ID %q: %v", want, err)
	}
	chain, err := readCerts(chainPath)
	if err != nil {
		fail(2, "%s: %v", chainPath, err)
	}
	bundle, err := x509bundle.Load(expected.TrustDomain(), bundlePath)
	if err != nil {
		fail(2, "%s: %v", bundlePath, err)
	}
	if bundle.Empty() {
		fail(2, "%s: no X.509 authorities", bundlePath)
	}

	got, _, err := x509svid.Verify(chain, bundle, opts...)
	if err != nil {
		fail(1, "REJECTED: %v", err)
	}
	if got != expected {
		fail(1, "REJECTED: the SVID is for %s, expected %s", got, expected)
	}
	fmt.Println(got.String())
}

// readCerts parses every CERTIFICATE block of a PEM file, in order.
func readCerts(path string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %v", len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("no CERTIFICATE in the file")
	}
	return certs, nil
}

func fail(code int, format string, args ...any) {
	fmt.Fprintf(os.Stderr, "gospiffe-check: "+format+"\n", args...)
	os.Exit(code)
}
