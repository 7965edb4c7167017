package kmipdev

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Certs are the PEM files of a development PKI: a CA, a server certificate
// for 127.0.0.1/localhost and a client certificate (clientAuth). ECDSA
// P-256, which kmip-go and PyKMIP both accept.
type Certs struct {
	CA, CAKey, ServerCert, ServerKey, ClientCert, ClientKey string
}

// EnsureCerts creates the PKI in dir unless it is already there.
func EnsureCerts(dir string) (Certs, error) {
	c := Certs{
		CA: filepath.Join(dir, "ca.pem"), CAKey: filepath.Join(dir, "ca.key"),
		ServerCert: filepath.Join(dir, "server.pem"), ServerKey: filepath.Join(dir, "server.key"),
		ClientCert: filepath.Join(dir, "client.pem"), ClientKey: filepath.Join(dir, "client.key"),
	}
	if _, err := os.Stat(c.ClientKey); err == nil {
		return c, nil
	}
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tdeshim development CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().AddDate(2, 0, 0),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTpl, caTpl, &caKey.PublicKey, caKey)
	if err != nil {
		return c, err
	}
	caCert, _ := x509.ParseCertificate(caDER)
	if err := writePEM(c.CA, "CERTIFICATE", caDER, 0o644); err != nil {
		return c, err
	}
	if err := writeKey(c.CAKey, caKey); err != nil {
		return c, err
	}
	if err := IssueCert(caCert, caKey, "tdeshim-dev-kmip", x509.ExtKeyUsageServerAuth, time.Now().AddDate(1, 0, 0), c.ServerCert, c.ServerKey); err != nil {
		return c, err
	}
	if err := IssueCert(caCert, caKey, "tdeshim", x509.ExtKeyUsageClientAuth, time.Now().AddDate(1, 0, 0), c.ClientCert, c.ClientKey); err != nil {
		return c, err
	}
	return c, nil
}

// IssueCert signs a leaf certificate valid until notAfter (tests use a past
// date to make an expired one).
func IssueCert(ca *x509.Certificate, caKey *ecdsa.PrivateKey, cn string, usage x509.ExtKeyUsage, notAfter time.Time, certPath, keyPath string) error {
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: cn},
		NotBefore: notAfter.AddDate(-1, 0, -1), NotAfter: notAfter,
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyAgreement, ExtKeyUsage: []x509.ExtKeyUsage{usage},
	}
	if usage == x509.ExtKeyUsageServerAuth {
		tpl.DNSNames = []string{"localhost"}
		tpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, ca, &k.PublicKey, caKey)
	if err != nil {
		return err
	}
	if err := writePEM(certPath, "CERTIFICATE", der, 0o644); err != nil {
		return err
	}
	return writeKey(keyPath, k)
}

// LoadCA reads the CA certificate and key of a development PKI.
func (c Certs) LoadCA() (*x509.Certificate, *ecdsa.PrivateKey, error) {
	pair, err := tls.LoadX509KeyPair(c.CA, c.CAKey)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, nil, err
	}
	k, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, nil, errors.New("kmipdev: CA key is not ECDSA")
	}
	return cert, k, nil
}

// ServerTLS is the listener's TLS configuration: client certificates signed
// by the CA are required.
func (c Certs) ServerTLS() (*tls.Config, error) {
	pair, err := tls.LoadX509KeyPair(c.ServerCert, c.ServerKey)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	b, err := os.ReadFile(c.CA)
	if err != nil {
		return nil, err
	}
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("kmipdev: %s holds no certificate", c.CA)
	}
	return &tls.Config{Certificates: []tls.Certificate{pair}, ClientCAs: pool,
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}, nil
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), mode)
}

func writeKey(path string, k *ecdsa.PrivateKey) error {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return err
	}
	return writePEM(path, "EC PRIVATE KEY", der, 0o600)
}
