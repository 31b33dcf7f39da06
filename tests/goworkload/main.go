// goworkload is a SPIFFE workload written with go-spiffe's workloadapi package, a client of
// the Workload API that citadel did not write. The integration tests run it against
// `citadel agent --workload-api-socket` (the socket comes from SPIFFE_ENDPOINT_SOCKET or
// -socket unix:///path):
//
//	goworkload x509 [-timeout 60s]
//	    Watches X.509 contexts and X.509 bundles until the timeout, printing one JSON line per
//	    update: {"kind":"svid",...} (the default SVID, verified with x509svid.Verify against
//	    the bundle received with it) and {"kind":"bundles",...}.
//	goworkload jwt -audience AUD
//	    Fetches a JWT-SVID for AUD and the JWT bundles, validates the token locally with
//	    jwtsvid.ParseAndValidate and remotely with ValidateJWTSVID, checks that another
//	    audience is refused, and prints one JSON line. Exit 1 on any failure.
package main

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

var out sync.Mutex

func emit(v map[string]any) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	out.Lock()
	defer out.Unlock()
	fmt.Fprintln(os.Stdout, string(b))
}

func fingerprints(certs []*x509.Certificate) []string {
	fps := make([]string, 0, len(certs))
	for _, c := range certs {
		sum := sha256.Sum256(c.Raw)
		fps = append(fps, hex.EncodeToString(sum[:]))
	}
	return fps
}

type watcher struct{}

func (watcher) OnX509ContextUpdate(c *workloadapi.X509Context) {
	svid := c.DefaultSVID()
	line := map[string]any{
		"kind":      "svid",
		"id":        svid.ID.String(),
		"serial":    svid.Certificates[0].SerialNumber.Text(16),
		"not_after": svid.Certificates[0].NotAfter.Unix(),
		"chain":     len(svid.Certificates),
		"svids":     len(c.SVIDs),
	}
	if b, err := c.Bundles.GetX509BundleForTrustDomain(svid.ID.TrustDomain()); err == nil {
		line["roots"] = fingerprints(b.X509Authorities())
	}
	if got, _, err := x509svid.Verify(svid.Certificates, c.Bundles); err != nil {
		line["verify_error"] = err.Error()
	} else {
		line["verified"] = got.String()
	}
	emit(line)
}

func (watcher) OnX509ContextWatchError(err error) {
	emit(map[string]any{"kind": "error", "watch": "x509context", "error": err.Error()})
}

func (watcher) OnX509BundlesUpdate(s *x509bundle.Set) {
	domains := map[string][]string{}
	for _, b := range s.Bundles() {
		domains[b.TrustDomain().IDString()] = fingerprints(b.X509Authorities())
	}
	emit(map[string]any{"kind": "bundles", "bundles": domains})
}

func (watcher) OnX509BundlesWatchError(err error) {
	emit(map[string]any{"kind": "error", "watch": "x509bundles", "error": err.Error()})
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: goworkload x509|jwt [flags]")
		os.Exit(2)
	}
	mode := os.Args[1]
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	socket := fs.String("socket", "", "unix:///path (default: SPIFFE_ENDPOINT_SOCKET)")
	timeout := fs.Duration("timeout", 60*time.Second, "how long to run")
	audience := fs.String("audience", "", "jwt: the audience")
	_ = fs.Parse(os.Args[2:])

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var opts []workloadapi.ClientOption
	if *socket != "" {
		opts = append(opts, workloadapi.WithAddr(*socket))
	}
	client, err := workloadapi.New(ctx, opts...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "goworkload: %v\n", err)
		os.Exit(2)
	}
	defer client.Close()

	switch mode {
	case "x509":
		var wg sync.WaitGroup
		wg.Add(2)
		go func() { defer wg.Done(); _ = client.WatchX509Context(ctx, watcher{}) }()
		go func() { defer wg.Done(); _ = client.WatchX509Bundles(ctx, watcher{}) }()
		wg.Wait()
	case "jwt":
		if err := jwtCheck(ctx, client, *audience); err != nil {
			fmt.Fprintf(os.Stderr, "goworkload: %v\n", err)
			os.Exit(1)
		}
	default:
		fmt.Fprintf(os.Stderr, "goworkload: unknown mode %q\n", mode)
		os.Exit(2)
	}
}

func jwtCheck(ctx context.Context, client *workloadapi.Client, audience string) error {
	svid, err := client.FetchJWTSVID(ctx, jwtsvid.Params{Audience: audience})
	if err != nil {
		return fmt.Errorf("FetchJWTSVID: %w", err)
	}
	bundles, err := client.FetchJWTBundles(ctx)
	if err != nil {
		return fmt.Errorf("FetchJWTBundles: %w", err)
	}
	token := svid.Marshal()
	local, err := jwtsvid.ParseAndValidate(token, bundles, []string{audience})
	if err != nil {
		return fmt.Errorf("jwtsvid.ParseAndValidate: %w", err)
	}
	remote, err := client.ValidateJWTSVID(ctx, token, audience)
	if err != nil {
		return fmt.Errorf("ValidateJWTSVID: %w", err)
	}
	if _, err := client.ValidateJWTSVID(ctx, token, audience+"-other"); err == nil {
		return fmt.Errorf("ValidateJWTSVID accepted the token for another audience")
	}
	if _, err := jwtsvid.ParseAndValidate(token, bundles, []string{audience + "-other"}); err == nil {
		return fmt.Errorf("ParseAndValidate accepted the token for another audience")
	}
	emit(map[string]any{
		"id":        local.ID.String(),
		"remote_id": remote.ID.String(),
		"audience":  local.Audience,
		"expiry":    local.Expiry.Unix(),
	})
	return nil
}
