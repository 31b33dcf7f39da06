// gojwtsvid-check validates a JWT-SVID with go-spiffe, a third-party SPIFFE implementation,
// the way a go-spiffe relying party would:
//
//	gojwtsvid-check TOKEN_FILE JWKS_FILE TRUST_DOMAIN AUDIENCE
//
// TOKEN_FILE holds the JWS compact serialization, JWKS_FILE the trust domain's JWT bundle
// (a JWK Set, as citadel's FetchJwtBundle or `citadel ca jwt-bundle` give it). The bundle
// is parsed with jwtbundle.Parse and the token checked with jwtsvid.ParseAndValidate
// (signature, kid, alg, typ, sub in the trust domain, aud, exp) at the current time.
// On success it prints the SPIFFE ID and exits 0; otherwise it explains on stderr and
// exits 1 (2 for a usage or input error).
package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
)

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: gojwtsvid-check TOKEN_FILE JWKS_FILE TRUST_DOMAIN AUDIENCE")
		os.Exit(2)
	}
	tokenPath, jwksPath, tdName, audience := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	td, err := spiffeid.TrustDomainFromString(tdName)
	if err != nil {
		fail(2, "trust domain %q: %v", tdName, err)
	}
	token, err := os.ReadFile(tokenPath)
	if err != nil {
		fail(2, "%s: %v", tokenPath, err)
	}
	jwks, err := os.ReadFile(jwksPath)
	if err != nil {
		fail(2, "%s: %v", jwksPath, err)
	}
	bundle, err := jwtbundle.Parse(td, jwks)
	if err != nil {
		fail(1, "BUNDLE REJECTED: %v", err)
	}
	svid, err := jwtsvid.ParseAndValidate(strings.TrimSpace(string(token)), bundle, []string{audience})
	if err != nil {
		fail(1, "REJECTED: %v", err)
	}
	fmt.Println(svid.ID.String())
}

func fail(code int, format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(code)
}
