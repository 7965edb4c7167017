package keys

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
)

// FileProviderWarning is printed wherever the file provider is in use.
const FileProviderWarning = "DEVELOPMENT ONLY: the principal key is a local file; anyone who copies it with the volume reads the data. Use a KMIP key manager in production."

// fileProvider keeps the 32-byte principal key from a 0600 file in locked
// memory. It exists for development and the quick start.
type fileProvider struct {
	path string
	key  *Secret
}

func init() {
	Register("file", func(ctx context.Context, c Config) (Provider, error) {
		return OpenFileProvider(c.KeyFile)
	})
}

// CreateKeyFile writes a new random principal key (hex) to path, mode 0600.
// It refuses to overwrite an existing file.
func CreateKeyFile(path string) error {
	k, err := RandomSecret(32)
	if err != nil {
		return err
	}
	defer k.Wipe()
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("create key file: %w", err)
	}
	buf := make([]byte, 65)
	hex.Encode(buf, k.Bytes())
	buf[64] = '\n'
	_, err = f.Write(buf)
	clear(buf)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// OpenFileProvider reads the principal key: 32 raw bytes or 64 hex digits.
// It refuses a file that others can read.
func OpenFileProvider(path string) (Provider, error) {
	if path == "" {
		return nil, errors.New("file key provider: no key file given (--key-file)")
	}
	st, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("file key provider: %s does not exist (create one with `tdeshim init --create-key-file`)", path)
	} else if err != nil {
		return nil, fmt.Errorf("file key provider: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("file key provider: %s is readable by group or others (mode %o); run chmod 600 %s", path, st.Mode().Perm(), path)
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("file key provider: %w", err)
	}
	defer clear(raw)
	var key []byte
	switch t := strings.TrimSpace(string(raw)); {
	case len(raw) == 32:
		key = append([]byte(nil), raw...)
	case len(t) == 64:
		key, err = hex.DecodeString(t)
		if err != nil {
			return nil, fmt.Errorf("file key provider: %s is not 64 hex digits", path)
		}
	default:
		return nil, fmt.Errorf("file key provider: %s must hold 32 bytes or 64 hex digits", path)
	}
	s, err := SecretFrom(key)
	if err != nil {
		return nil, err
	}
	return &fileProvider{path: path, key: s}, nil
}

func (p *fileProvider) Config() Config {
	return Config{Provider: "file", KeyFile: p.path, Principal: "file"}
}

func (p *fileProvider) Wrap(ctx context.Context, key *Secret, aad []byte) (Wrapped, error) {
	return SealGCM(p.key.Bytes(), key, aad)
}

func (p *fileProvider) Unwrap(ctx context.Context, w Wrapped, aad []byte) (*Secret, error) {
	return OpenGCM(p.key.Bytes(), w, aad)
}

func (p *fileProvider) Check(ctx context.Context) error {
	if p.key.Bytes() == nil {
		return errors.New("file key provider: closed")
	}
	return nil
}

func (p *fileProvider) Development() bool { return true }

func (p *fileProvider) Close() error {
	p.key.Wipe()
	return nil
}
