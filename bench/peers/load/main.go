// peers-load is the one load generator scripts/bench-peers.sh points at every CA it compares
// (issue #26): Istio's CreateCertificate (citadel, istiod) over TLS gRPC with a bearer token,
// and SPIRE server's X.509-SVID minting API (spire.api.server.svid.v1.SVID/MintX509SVID) over
// its API socket. It prints citadel-bench's summary lines, so one parser reads every run.
//
// Every request carries its own CSR (a distinct SPIFFE ID each) and, for Istio's protocol, its
// own RS256 token (a distinct service account each, signed with the dev key in certs-dev/).
// Keys: one per request for ec-p256; a pool of 256 for rsa-2048 (RSA key generation would
// otherwise dominate the set-up), each CSR still distinct. SPIRE authorises the caller by the
// local socket (allow_local in SPIRE's policy): no token is verified per request there, which
// favours SPIRE, and the report says so.
package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"net/url"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	svidv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/server/svid/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	istioca "istio.io/api/security/v1alpha1"
)

type work struct {
	csr   []byte
	token string
}

func main() {
	target := flag.String("target", "istio", "istio (CreateCertificate over TLS) or spire (MintX509SVID over the API socket)")
	addr := flag.String("addr", "", "istio: the CA's HOST:PORT")
	root := flag.String("root", "", "istio: PEM roots of the CA's serving certificate")
	serverName := flag.String("server-name", "", "istio: TLS server name (default: the host of -addr)")
	jwtKey := flag.String("jwt-key", "certs-dev/jwt-signing-key.pem", "istio: the RS256 key tokens are signed with")
	jwks := flag.String("jwks", "certs-dev/jwks.json", "istio: its JWKS (for the kid)")
	issuer := flag.String("issuer", "https://citadel.dev.invalid", "istio: tokens' iss")
	audience := flag.String("audience", "istio-ca", "istio: tokens' aud")
	connections := flag.Int("connections", 4, "istio: HTTP/2 connections the requests are spread over")
	socket := flag.String("socket", "", "spire: SPIRE server's API socket (socket_path)")
	td := flag.String("trust-domain", "cluster.local", "trust domain of the SPIFFE IDs asked for")
	concurrency := flag.Int("concurrency", 64, "requests in flight (closed loop)")
	requests := flag.Int("requests", 20000, "requests measured after the warm-up")
	warmup := flag.Int("warmup", 1000, "requests sent before measuring")
	keyType := flag.String("key-type", "ec-p256", "CSR key: ec-p256 or rsa-2048")
	rate := flag.Float64("rate", 0, "open loop: requests per second on a fixed schedule (0: closed loop)")
	pid := flag.Int("server-pid", 0, "the server's PID, for its CPU time and peak RSS")
	ttl := flag.Int("ttl", 86400, "certificate TTL asked for, seconds")
	flag.Parse()

	n := *warmup + *requests + 1
	var sign func(claims map[string]any) string
	if *target == "istio" {
		sign = tokenSigner(*jwtKey, *jwks)
	}
	ws := makeWork(n, *keyType, *td, func(ns, sa string) string {
		if sign == nil {
			return ""
		}
		now := time.Now().Unix()
		return sign(map[string]any{
			"iss": *issuer, "aud": []string{*audience}, "sub": "system:serviceaccount:" + ns + ":" + sa,
			"iat": now, "nbf": now, "exp": now + 3600,
			"kubernetes.io": map[string]any{"namespace": ns, "serviceaccount": map[string]any{"name": sa, "uid": "00000000-0000-0000-0000-000000000000"}},
		})
	})

	var call func(i int) (time.Duration, error)
	switch *target {
	case "spire":
		if *socket == "" {
			fail("-target spire needs -socket")
		}
		conn, err := grpc.NewClient("unix://"+*socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			fail("dial: %v", err)
		}
		client := svidv1.NewSVIDClient(conn)
		call = func(i int) (time.Duration, error) {
			start := time.Now()
			resp, err := client.MintX509SVID(context.Background(), &svidv1.MintX509SVIDRequest{Csr: ws[i].csr, Ttl: int32(*ttl)})
			if err == nil && len(resp.GetSvid().GetCertChain()) == 0 {
				err = fmt.Errorf("empty chain")
			}
			return time.Since(start), err
		}
	case "istio":
		if *addr == "" || *root == "" {
			fail("-target istio needs -addr and -root")
		}
		pem, err := os.ReadFile(*root)
		if err != nil {
			fail("roots: %v", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			fail("no certificate in %s", *root)
		}
		name := *serverName
		if name == "" {
			name, _, _ = strings.Cut(*addr, ":")
		}
		creds := credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: name, MinVersion: tls.VersionTLS12})
		clients := make([]istioca.IstioCertificateServiceClient, *connections)
		for c := range clients {
			conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(creds))
			if err != nil {
				fail("dial: %v", err)
			}
			clients[c] = istioca.NewIstioCertificateServiceClient(conn)
		}
		call = func(i int) (time.Duration, error) {
			start := time.Now()
			ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+ws[i].token)
			block := pemEncode("CERTIFICATE REQUEST", ws[i].csr)
			resp, err := clients[i%len(clients)].CreateCertificate(ctx, &istioca.IstioCertificateRequest{Csr: block, ValidityDuration: int64(*ttl)})
			if err == nil && len(resp.GetCertChain()) < 2 {
				err = fmt.Errorf("chain of %d entries", len(resp.GetCertChain()))
			}
			return time.Since(start), err
		}
	default:
		fail("unknown -target %q", *target)
	}
	// One request end to end before trusting any number.
	if _, err := call(0); err != nil {
		fail("first request: %v", err)
	}
	runN(1, *warmup, *concurrency, 0, call)
	cpu0 := cpuTime(*pid)
	t0 := time.Now()
	lat, errs := runN(1+*warmup, *requests, *concurrency, *rate, call)
	wall := time.Since(t0)
	cpu := cpuTime(*pid) - cpu0
	sort.Slice(lat, func(a, b int) bool { return lat[a] < lat[b] })
	mode := fmt.Sprintf("%d streams", *concurrency)
	if *rate > 0 {
		mode = fmt.Sprintf("open loop at %.0f/s", *rate)
	}
	ok := len(lat)
	how := "TLS gRPC, distinct RS256 tokens"
	if *target == "spire" {
		how = "the API socket (gRPC), no token"
	}
	fmt.Printf("peers-load %s: %d requests over %s, %s, %s CSRs\n", *target, ok+errs, how, mode, *keyType)
	fmt.Printf("succeeded:               %d (%d errors, 0 denied, 0 dropped)\n", ok, errs)
	fmt.Printf("throughput (wall clock): %.0f certificates/s over %.1f s\n", float64(ok)/wall.Seconds(), wall.Seconds())
	fmt.Printf("latency p50 / p99 / max: %s / %s / %s\n", ms(pct(lat, 0.50)), ms(pct(lat, 0.99)), ms(pct(lat, 1)))
	if *pid > 0 && ok > 0 {
		fmt.Printf("server CPU:              %.2f s = %.1f µs per certificate = %.0f certificates per server CPU-second\n",
			cpu.Seconds(), cpu.Seconds()*1e6/float64(ok), float64(ok)/cpu.Seconds())
		fmt.Printf("server peak RSS:         %d KiB\n", peakRSS(*pid))
	}
}

// makeWork makes n distinct requests: service account sa-<i> in one of 50 namespaces, its
// CSR (URI SAN of that identity) and its token.
func makeWork(n int, keyType, td string, token func(ns, sa string) string) []work {
	ws := make([]work, n)
	var keys []crypto.Signer
	if keyType == "rsa-2048" {
		keys = make([]crypto.Signer, 256)
		for i := range keys {
			keys[i] = newKey(keyType)
		}
	}
	var wg sync.WaitGroup
	per := (n + 1) / 2
	for part := 0; part < n; part += per {
		wg.Add(1)
		go func(lo, hi int) {
			defer wg.Done()
			for i := lo; i < hi && i < n; i++ {
				ns, sa := fmt.Sprintf("bench-%d", i%50), fmt.Sprintf("sa-%d", i)
				var key crypto.Signer
				if keys != nil {
					key = keys[i%len(keys)]
				} else {
					key = newKey(keyType)
				}
				ws[i] = work{csr: makeCSR(key, fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", td, ns, sa)), token: token(ns, sa)}
			}
		}(part, part+per)
	}
	wg.Wait()
	return ws
}

// tokenSigner loads the RS256 key (PKCS#8 or PKCS#1 PEM) and the kid of its JWKS.
func tokenSigner(keyPath, jwksPath string) func(map[string]any) string {
	raw, err := os.ReadFile(keyPath)
	if err != nil {
		fail("token key: %v", err)
	}
	block, _ := pemDecode(raw)
	if block == nil {
		fail("no PEM block in %s", keyPath)
	}
	var key *rsa.PrivateKey
	if k, err := x509.ParsePKCS8PrivateKey(block.Bytes); err == nil {
		rk, ok := k.(*rsa.PrivateKey)
		if !ok {
			fail("%s is not an RSA key", keyPath)
		}
		key = rk
	} else if key, err = x509.ParsePKCS1PrivateKey(block.Bytes); err != nil {
		fail("token key: %v", err)
	}
	var set struct {
		Keys []struct {
			Kid string `json:"kid"`
		} `json:"keys"`
	}
	if b, err := os.ReadFile(jwksPath); err != nil || json.Unmarshal(b, &set) != nil || len(set.Keys) == 0 {
		fail("no key in the JWKS %s", jwksPath)
	}
	header := b64(mustJSON(map[string]any{"alg": "RS256", "kid": set.Keys[0].Kid, "typ": "JWT"}))
	return func(claims map[string]any) string {
		input := header + "." + b64(mustJSON(claims))
		sum := sha256.Sum256([]byte(input))
		sig, err := rsa.SignPKCS1v15(rand.Reader, key, crypto.SHA256, sum[:])
		if err != nil {
			fail("sign: %v", err)
		}
		return input + "." + b64(sig)
	}
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		fail("json: %v", err)
	}
	return b
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func pemEncode(kind string, der []byte) string {
	return string(pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}))
}

func pemDecode(b []byte) (*pem.Block, []byte) { return pem.Decode(b) }

// runN sends n requests: closed loop with `concurrency` workers, or open loop at `rate`
// (each request starts on its schedule slot; the latency counts from that slot, so a late
// start is the server's queueing, as citadel-bench measures it).
func runN(first, n, concurrency int, rate float64, call func(int) (time.Duration, error)) ([]time.Duration, int) {
	var mu sync.Mutex
	lat := make([]time.Duration, 0, n)
	var errs int64
	record := func(d time.Duration, err error) {
		if err != nil {
			if atomic.AddInt64(&errs, 1) <= 3 {
				fmt.Fprintf(os.Stderr, "request failed: %v\n", err)
			}
			return
		}
		mu.Lock()
		lat = append(lat, d)
		mu.Unlock()
	}
	var wg sync.WaitGroup
	if rate > 0 {
		start := time.Now()
		sem := make(chan struct{}, 4096)
		for i := 0; i < n; i++ {
			slot := start.Add(time.Duration(float64(i) / rate * float64(time.Second)))
			time.Sleep(time.Until(slot))
			sem <- struct{}{}
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				_, err := call(first + i)
				record(time.Since(slot), err)
				<-sem
			}(i)
		}
	} else {
		var next int64 = -1
		for w := 0; w < concurrency; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					i := int(atomic.AddInt64(&next, 1))
					if i >= n {
						return
					}
					record(call(first + i))
				}
			}()
		}
	}
	wg.Wait()
	return lat, int(errs)
}

func newKey(keyType string) crypto.Signer {
	var key crypto.Signer
	var err error
	switch keyType {
	case "ec-p256":
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "rsa-2048":
		key, err = rsa.GenerateKey(rand.Reader, 2048)
	default:
		fail("unknown -key-type %q", keyType)
	}
	if err != nil {
		fail("key: %v", err)
	}
	return key
}

func makeCSR(key crypto.Signer, id string) []byte {
	u, err := url.Parse(id)
	if err != nil {
		fail("id: %v", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		fail("csr: %v", err)
	}
	return der
}

// cpuTime is utime + stime of the process, from /proc (clock ticks of 1/100 s on Linux).
func cpuTime(pid int) time.Duration {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseInt(fields[11], 10, 64)
	st, _ := strconv.ParseInt(fields[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

func peakRSS(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmHWM:") {
			v, _ := strconv.ParseInt(strings.Fields(line)[1], 10, 64)
			return v
		}
	}
	return 0
}

func pct(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q * float64(len(sorted)-1))
	return sorted[i]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d.Microseconds())/1000) }

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "peers-load: "+format+"\n", args...)
	os.Exit(1)
}
