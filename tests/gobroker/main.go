// gobroker is a SPIFFE broker written on go-spiffe's generated Broker API client
// (github.com/spiffe/go-spiffe/v2/exp/proto/spiffe/broker, v2.9.0): a client of
// `spiffe.broker.API` that citadel did not write. The integration tests run it against
// citadel's CA port (`citadel serve --broker-ids ...`):
//
//	gobroker -addr HOST:PORT -ca ROOT_PEM [-cert CERT_PEM -key KEY_PEM] [-token FILE]
//	         [-no-header] [-messages N] [-timeout 30s] CALL ARGS...
//
//	x509 NS NAME [UID]        SubscribeToX509SVID for pod NS/NAME: reads N messages; each
//	                          SVID is parsed with x509svid.ParseRaw (key matches leaf) and
//	                          verified with x509svid.Verify against the bundle sent with it.
//	bundles NS NAME           SubscribeToX509Bundles: the first message, parsed with
//	                          x509bundle.ParseRaw.
//	jwt NS NAME AUDIENCE      FetchJWTSVID, then SubscribeToJWTBundles; the token is
//	                          validated with jwtsvid.ParseAndValidate against that bundle.
//	pid PID                   SubscribeToX509SVID with a WorkloadPIDReference.
//	object PLURAL GROUP NS NAME  SubscribeToX509SVID with another Kubernetes object type.
//
// Each message (or the call's error) is one JSON line on stdout: {"code":"OK",...} or
// {"code":"NotFound","message":...}. Exit 0 when every call succeeded, 1 on a gRPC error,
// 2 on a usage or local failure (bad files, a response go-spiffe rejects).
package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/exp/proto/spiffe/broker"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

func emit(v map[string]any) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(b))
}

func fail(code int, format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(code)
}

// rpcFailed prints the gRPC status of err and exits 1.
func rpcFailed(err error) {
	s := status.Convert(err)
	emit(map[string]any{"code": s.Code().String(), "message": s.Message()})
	os.Exit(1)
}

func podRef(ns, name, uid string) *broker.WorkloadReference {
	return objectRef("pods", "core", ns, name, uid)
}

func objectRef(plural, group, ns, name, uid string) *broker.WorkloadReference {
	return pack(&broker.KubernetesObjectReference{
		Type: &broker.KubernetesObjectType{Plural: plural, Group: group},
		Key:  &broker.KubernetesObjectKey{Namespace: ns, Name: name},
		Uid:  uid,
	})
}

func pack(m proto.Message) *broker.WorkloadReference {
	a, err := anypb.New(m)
	if err != nil {
		fail(2, "anypb.New: %v", err)
	}
	return &broker.WorkloadReference{Reference: a}
}

func fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:8])
}

func main() {
	addr := flag.String("addr", "", "the CA port, HOST:PORT")
	caFile := flag.String("ca", "", "PEM roots that verify the CA port's serving certificate")
	serverName := flag.String("server-name", "localhost", "the CA port's TLS name")
	certFile := flag.String("cert", "", "the broker's X509-SVID chain, PEM (client certificate)")
	keyFile := flag.String("key", "", "the broker's key, PEM")
	tokenFile := flag.String("token", "", "the broker's pod-bound token, sent as authorization: Bearer")
	noHeader := flag.Bool("no-header", false, "omit the broker.spiffe.io metadata")
	messages := flag.Int("messages", 1, "stream messages to read")
	timeout := flag.Duration("timeout", 30*time.Second, "overall deadline")
	trustDomain := flag.String("trust-domain", "cluster.local", "the trust domain of the SVIDs")
	flag.Parse()
	args := flag.Args()
	if *addr == "" || *caFile == "" || len(args) == 0 {
		fail(2, "usage: gobroker -addr HOST:PORT -ca ROOT_PEM [-cert C -key K] [-token F] CALL ARGS...")
	}
	td, err := spiffeid.TrustDomainFromString(*trustDomain)
	if err != nil {
		fail(2, "trust domain: %v", err)
	}
	roots := x509.NewCertPool()
	rootPEM, err := os.ReadFile(*caFile)
	if err != nil || !roots.AppendCertsFromPEM(rootPEM) {
		fail(2, "%s: no PEM roots (%v)", *caFile, err)
	}
	tlsConfig := &tls.Config{RootCAs: roots, ServerName: *serverName, MinVersion: tls.VersionTLS12}
	if *certFile != "" {
		pair, err := tls.LoadX509KeyPair(*certFile, *keyFile)
		if err != nil {
			fail(2, "client certificate: %v", err)
		}
		tlsConfig.Certificates = []tls.Certificate{pair}
	}
	conn, err := grpc.NewClient("passthrough:///"+*addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsConfig)))
	if err != nil {
		fail(2, "dial: %v", err)
	}
	defer conn.Close()
	client := broker.NewAPIClient(conn)

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if !*noHeader {
		ctx = metadata.AppendToOutgoingContext(ctx, "broker.spiffe.io", "true")
	}
	if *tokenFile != "" {
		token, err := os.ReadFile(*tokenFile)
		if err != nil {
			fail(2, "%s: %v", *tokenFile, err)
		}
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+strings.TrimSpace(string(token)))
	}

	need := func(n int) {
		if len(args) < n {
			fail(2, "%s needs %d arguments", args[0], n-1)
		}
	}
	switch args[0] {
	case "x509":
		need(3)
		uid := ""
		if len(args) > 3 {
			uid = args[3]
		}
		x509Stream(ctx, client, td, podRef(args[1], args[2], uid), *messages)
	case "pid":
		need(2)
		pid, err := strconv.Atoi(args[1])
		if err != nil {
			fail(2, "pid: %v", err)
		}
		x509Stream(ctx, client, td, pack(&broker.WorkloadPIDReference{Pid: int32(pid)}), *messages)
	case "object":
		need(5)
		x509Stream(ctx, client, td, objectRef(args[1], args[2], args[3], args[4], ""), *messages)
	case "bundles":
		need(3)
		stream, err := client.SubscribeToX509Bundles(ctx, &broker.SubscribeToX509BundlesRequest{Reference: podRef(args[1], args[2], "")})
		if err != nil {
			rpcFailed(err)
		}
		for i := 0; i < *messages; i++ {
			m, err := stream.Recv()
			if err != nil {
				rpcFailed(err)
			}
			line := map[string]any{"code": "OK"}
			for key, raw := range m.Bundles {
				id, err := spiffeid.TrustDomainFromString(key)
				if err != nil {
					fail(2, "bundle key %q: %v", key, err)
				}
				b, err := x509bundle.ParseRaw(id, raw)
				if err != nil {
					fail(2, "bundle %q rejected by x509bundle.ParseRaw: %v", key, err)
				}
				line[key] = len(b.X509Authorities())
			}
			emit(line)
		}
	case "jwt":
		need(4)
		ref := podRef(args[1], args[2], "")
		resp, err := client.FetchJWTSVID(ctx, &broker.FetchJWTSVIDRequest{Reference: ref, Audience: []string{args[3]}})
		if err != nil {
			rpcFailed(err)
		}
		stream, err := client.SubscribeToJWTBundles(ctx, &broker.SubscribeToJWTBundlesRequest{Reference: ref})
		if err != nil {
			rpcFailed(err)
		}
		m, err := stream.Recv()
		if err != nil {
			rpcFailed(err)
		}
		raw, ok := m.Bundles[td.IDString()]
		if !ok {
			fail(2, "no JWT bundle for %s", td.IDString())
		}
		bundle, err := jwtbundle.Parse(td, raw)
		if err != nil {
			fail(2, "JWT bundle rejected by jwtbundle.Parse: %v", err)
		}
		if len(resp.Svids) != 1 {
			fail(2, "%d JWT-SVIDs, want 1", len(resp.Svids))
		}
		svid, err := jwtsvid.ParseAndValidate(resp.Svids[0].Svid, bundle, []string{args[3]})
		if err != nil {
			fail(2, "JWT-SVID rejected by jwtsvid.ParseAndValidate: %v", err)
		}
		if svid.ID.String() != resp.Svids[0].SpiffeId {
			fail(2, "token is for %s but the message says %s", svid.ID, resp.Svids[0].SpiffeId)
		}
		emit(map[string]any{"code": "OK", "spiffe_id": svid.ID.String(), "audience": svid.Audience, "expiry": svid.Expiry.Unix()})
	default:
		fail(2, "unknown call %q", args[0])
	}
}

// x509Stream reads n messages of SubscribeToX509SVID, each checked by go-spiffe.
func x509Stream(ctx context.Context, client broker.APIClient, td spiffeid.TrustDomain, ref *broker.WorkloadReference, n int) {
	stream, err := client.SubscribeToX509SVID(ctx, &broker.SubscribeToX509SVIDRequest{Reference: ref})
	if err != nil {
		rpcFailed(err)
	}
	for i := 0; i < n; i++ {
		m, err := stream.Recv()
		if err != nil {
			rpcFailed(err)
		}
		if len(m.Svids) != 1 {
			fail(2, "%d SVIDs in one message, want 1", len(m.Svids))
		}
		s := m.Svids[0]
		svid, err := x509svid.ParseRaw(s.X509Svid, s.X509SvidKey)
		if err != nil {
			fail(2, "SVID rejected by x509svid.ParseRaw: %v", err)
		}
		bundle, err := x509bundle.ParseRaw(td, s.Bundle)
		if err != nil {
			fail(2, "bundle rejected by x509bundle.ParseRaw: %v", err)
		}
		leaf := svid.Certificates[0]
		// At the leaf's own notBefore (plus a second): a test may run the server on a clock
		// ahead of this process's.
		id, _, err := x509svid.Verify(svid.Certificates, bundle, x509svid.WithTime(leaf.NotBefore.Add(time.Second)))
		if err != nil {
			fail(2, "SVID rejected by x509svid.Verify: %v", err)
		}
		if id.String() != s.SpiffeId {
			fail(2, "SVID is for %s but the message says %s", id, s.SpiffeId)
		}
		var exts []string
		for _, e := range leaf.Extensions {
			exts = append(exts, e.Id.String())
		}
		emit(map[string]any{
			"ext":         exts,
			"code":        "OK",
			"spiffe_id":   id.String(),
			"serial":      leaf.SerialNumber.Text(16),
			"fingerprint": fingerprint(leaf),
			"not_before":  leaf.NotBefore.Unix(),
			"not_after":   leaf.NotAfter.Unix(),
			"key":         fmt.Sprintf("%T", svid.PrivateKey),
			"chain":       len(svid.Certificates),
			"roots":       len(bundle.X509Authorities()),
		})
	}
}
