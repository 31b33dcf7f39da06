// gofederation exercises SPIFFE federation with go-spiffe's `federation` package, a
// third-party implementation, from both sides:
//
//	gofederation fetch TRUST_DOMAIN URL spiffe ENDPOINT_ID BOOTSTRAP_PEM
//	gofederation fetch TRUST_DOMAIN URL web ROOTS_PEM
//	gofederation serve TRUST_DOMAIN ADDR BUNDLE_JSON CERT_PEM KEY_PEM
//
// fetch: federation.FetchBundle with WithSPIFFEAuth (the endpoint must present an
// X.509-SVID for ENDPOINT_ID chaining to BOOTSTRAP_PEM) or WithWebPKIRoots; the document is
// parsed by spiffebundle.Read. On success it prints one JSON line: the trust domain, the
// X.509 authorities (PEM), the JWT authorities' key ids, spiffe_sequence and
// spiffe_refresh_hint (seconds), and exits 0; otherwise it explains on stderr and exits 1
// (2 for a usage or input error).
//
// serve: federation.NewHandler over BUNDLE_JSON (re-read and parsed with spiffebundle.Parse
// on every request, so a test can change it), over HTTPS with CERT_PEM/KEY_PEM (https_web).
// A BUNDLE_JSON starting with "RAW:" is served as is instead (a broken endpoint).
// Prints "serving" once listening.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"sort"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

type result struct {
	TrustDomain     string   `json:"trust_domain"`
	X509Authorities []string `json:"x509_authorities"`
	JWTKeyIDs       []string `json:"jwt_key_ids"`
	Sequence        *uint64  `json:"spiffe_sequence"`
	RefreshHintSecs *int64   `json:"spiffe_refresh_hint"`
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	switch os.Args[1] {
	case "fetch":
		fetch(os.Args[2:])
	case "serve":
		serve(os.Args[2:])
	default:
		usage()
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: gofederation fetch TD URL spiffe ENDPOINT_ID BOOTSTRAP_PEM | fetch TD URL web ROOTS_PEM | serve TD ADDR BUNDLE_JSON CERT_PEM KEY_PEM")
	os.Exit(2)
}

func fetch(args []string) {
	if len(args) < 4 {
		usage()
	}
	td, err := spiffeid.TrustDomainFromString(args[0])
	if err != nil {
		fail(2, "trust domain %q: %v", args[0], err)
	}
	url := args[1]
	var opt federation.FetchOption
	switch args[2] {
	case "spiffe":
		if len(args) != 5 {
			usage()
		}
		id, err := spiffeid.FromString(args[3])
		if err != nil {
			fail(2, "endpoint id %q: %v", args[3], err)
		}
		boot, err := x509bundle.Load(id.TrustDomain(), args[4])
		if err != nil {
			fail(2, "bootstrap bundle: %v", err)
		}
		opt = federation.WithSPIFFEAuth(boot, id)
	case "web":
		pool := x509.NewCertPool()
		roots, err := os.ReadFile(args[3])
		if err != nil || !pool.AppendCertsFromPEM(roots) {
			fail(2, "web roots %s: unreadable or no certificate (%v)", args[3], err)
		}
		opt = federation.WithWebPKIRoots(pool)
	default:
		usage()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	b, err := federation.FetchBundle(ctx, td, url, opt)
	if err != nil {
		fail(1, "FETCH REFUSED: %v", err)
	}
	r := result{TrustDomain: b.TrustDomain().String(), X509Authorities: []string{}, JWTKeyIDs: []string{}}
	for _, c := range b.X509Authorities() {
		r.X509Authorities = append(r.X509Authorities, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
	}
	for kid := range b.JWTAuthorities() {
		r.JWTKeyIDs = append(r.JWTKeyIDs, kid)
	}
	sort.Strings(r.JWTKeyIDs)
	if s, ok := b.SequenceNumber(); ok {
		r.Sequence = &s
	}
	if h, ok := b.RefreshHint(); ok {
		secs := int64(h / time.Second)
		r.RefreshHintSecs = &secs
	}
	out, _ := json.Marshal(r)
	fmt.Println(string(out))
}

// fileSource re-reads the bundle document on every request.
type fileSource struct {
	td   spiffeid.TrustDomain
	path string
}

func (s fileSource) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	doc, err := os.ReadFile(s.path)
	if err != nil {
		return nil, err
	}
	return spiffebundle.Parse(td, doc)
}

func serve(args []string) {
	if len(args) != 5 {
		usage()
	}
	td, err := spiffeid.TrustDomainFromString(args[0])
	if err != nil {
		fail(2, "trust domain %q: %v", args[0], err)
	}
	handler, err := federation.NewHandler(td, fileSource{td: td, path: args[2]})
	if err != nil {
		fail(2, "handler: %v", err)
	}
	cert, err := tls.LoadX509KeyPair(args[3], args[4])
	if err != nil {
		fail(2, "certificate: %v", err)
	}
	ln, err := net.Listen("tcp", args[1])
	if err != nil {
		fail(2, "listen %s: %v", args[1], err)
	}
	fmt.Println("serving")
	// A document starting with "RAW:" is served as is (status 200), bypassing go-spiffe's
	// handler, so a test can serve garbage the way a broken endpoint would.
	raw := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		doc, err := os.ReadFile(args[2])
		if err == nil && bytes.HasPrefix(doc, []byte("RAW:")) {
			w.Header().Set("Content-Type", "application/json")
			_, _ = w.Write(doc[4:])
			return
		}
		handler.ServeHTTP(w, r)
	})
	srv := &http.Server{Handler: raw, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}}, ReadHeaderTimeout: 10 * time.Second}
	fail(1, "%v", srv.ServeTLS(ln, "", ""))
}

func fail(code int, format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(code)
}
