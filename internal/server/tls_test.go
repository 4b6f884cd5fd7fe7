package server

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	visionv1 "github.com/visionserve/visionserve/proto/visionserve/v1"
)

// testPKI writes a CA, a server certificate for localhost and a client
// certificate, all PEM, into dir.
type testPKI struct {
	caFile, certFile, keyFile string
	pool                      *x509.CertPool
	client                    tls.Certificate
}

func newPKI(t *testing.T) testPKI {
	t.Helper()
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	issue := func(serial int64, usage x509.ExtKeyUsage, dns []string) ([]byte, *ecdsa.PrivateKey) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "test"}, DNSNames: dns,
			IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
			NotBefore:   time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{usage}, KeyUsage: x509.KeyUsageDigitalSignature,
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return der, key
	}
	write := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	srvDER, srvKey := issue(2, x509.ExtKeyUsageServerAuth, []string{"localhost"})
	srvKeyDER, _ := x509.MarshalECPrivateKey(srvKey)
	cliDER, cliKey := issue(3, x509.ExtKeyUsageClientAuth, nil)
	pki := testPKI{
		caFile:   write("ca.pem", "CERTIFICATE", caDER),
		certFile: write("server.pem", "CERTIFICATE", srvDER),
		keyFile:  write("server-key.pem", "EC PRIVATE KEY", srvKeyDER),
		pool:     x509.NewCertPool(),
		client:   tls.Certificate{Certificate: [][]byte{cliDER}, PrivateKey: cliKey},
	}
	pki.pool.AddCert(ca)
	return pki
}

func TestTLSAndMutualTLS(t *testing.T) {
	pki := newPKI(t)
	for _, tt := range []struct {
		name       string
		clientCA   bool
		clientCert bool
		want       codes.Code
	}{
		{"tls", false, false, codes.OK},
		{"mtls with client cert", true, true, codes.OK},
		{"mtls without client cert", true, false, codes.Unavailable},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ca := ""
			if tt.clientCA {
				ca = pki.caFile
			}
			serverTLS, err := TLSConfig(pki.certFile, pki.keyFile, ca)
			if err != nil {
				t.Fatal(err)
			}
			clientTLS := &tls.Config{RootCAs: pki.pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
			if tt.clientCert {
				clientTLS.Certificates = []tls.Certificate{pki.client}
			}
			e := newEnv(t, func(c *envConfig) {
				c.opts.TLS = serverTLS
				c.dialOpt = []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(clientTLS))}
			})
			_, err = e.vision.ListModels(ctxT(t), &visionv1.ListModelsRequest{})
			if status.Code(err) != tt.want {
				t.Errorf("ListModels: %v, want %v", err, tt.want)
			}
		})
	}
	if _, err := TLSConfig(pki.certFile, pki.keyFile, pki.certFile+".missing"); err == nil {
		t.Error("missing client CA accepted")
	}
	if _, err := TLSConfig(pki.caFile, pki.keyFile, ""); err == nil {
		t.Error("mismatched key accepted")
	}
}
