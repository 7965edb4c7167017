// Package kmipdev is a KMIP server for development, tests and the demo:
// mutual TLS with certificates it generates, Create/Activate/Locate/Get/
// GetAttributes/Encrypt/Decrypt (AES-GCM)/Revoke/Destroy, and a JSON file
// store. It keeps key material in a plain file: NOT FOR PRODUCTION. It is
// built on github.com/ovh/kmip-go's kmipserver framework.
package kmipdev

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/ovh/kmip-go"
	"github.com/ovh/kmip-go/kmipserver"
	"github.com/ovh/kmip-go/payloads"
)

// Warning is printed wherever the development server runs.
const Warning = "DEVELOPMENT KMIP SERVER: keys are stored unprotected in a local file. Never use it for real data."

type object struct {
	ID      string `json:"id"`
	Name    string `json:"name"`
	State   uint32 `json:"state"`
	Key     string `json:"key,omitempty"` // hex; empty once destroyed
	Created int64  `json:"created"`
}

// Server is a running development KMIP server.
type Server struct {
	Addr  string // host:port it listens on
	Certs Certs

	mu      sync.Mutex
	path    string
	objs    []*object
	nextID  int
	srv     *kmipserver.Server
	done    chan struct{}
	hookMu  sync.Mutex
	failNow func(op kmip.Operation) error // fault injection for tests
}

// Start serves on addr (e.g. 127.0.0.1:0) with state and certificates in
// dir (created if needed; certificates are made on first use).
func Start(dir, addr string, log *slog.Logger) (*Server, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	certs, err := EnsureCerts(dir)
	if err != nil {
		return nil, err
	}
	s := &Server{Certs: certs, path: filepath.Join(dir, "store.json"), done: make(chan struct{})}
	if b, err := os.ReadFile(s.path); err == nil {
		if err := json.Unmarshal(b, &s.objs); err != nil {
			return nil, fmt.Errorf("kmipdev: %s: %w", s.path, err)
		}
		s.nextID = len(s.objs)
	}
	tlsCfg, err := certs.ServerTLS()
	if err != nil {
		return nil, err
	}
	ln, err := tls.Listen("tcp", addr, tlsCfg)
	if err != nil {
		return nil, err
	}
	s.Addr = ln.Addr().String()
	exec := kmipserver.NewBatchExecutor()
	// kmipserver speaks KMIP 1.0 to 1.4; clients negotiate 1.4.
	exec.Route(kmip.OperationCreate, kmipserver.HandleFunc(s.create))
	exec.Route(kmip.OperationActivate, kmipserver.HandleFunc(s.activate))
	exec.Route(kmip.OperationLocate, kmipserver.HandleFunc(s.locate))
	exec.Route(kmip.OperationGet, kmipserver.HandleFunc(s.get))
	exec.Route(kmip.OperationGetAttributes, kmipserver.HandleFunc(s.getAttributes))
	exec.Route(kmip.OperationEncrypt, kmipserver.HandleFunc(s.encrypt))
	exec.Route(kmip.OperationDecrypt, kmipserver.HandleFunc(s.decrypt))
	exec.Route(kmip.OperationRevoke, kmipserver.HandleFunc(s.revoke))
	exec.Route(kmip.OperationDestroy, kmipserver.HandleFunc(s.destroy))
	exec.Use(func(next kmipserver.Next, ctx context.Context, msg *kmip.RequestMessage) (*kmip.ResponseMessage, error) {
		s.hookMu.Lock()
		f := s.failNow
		s.hookMu.Unlock()
		if f != nil && len(msg.BatchItem) > 0 {
			if err := f(msg.BatchItem[0].Operation); err != nil {
				return nil, err
			}
		}
		return next(ctx, msg)
	})
	s.srv = kmipserver.NewServer(ln, exec)
	go func() { s.srv.Serve(); close(s.done) }()
	if log != nil {
		log.Warn(Warning, "listen", s.Addr, "dir", dir)
	}
	return s, nil
}

// InjectFault makes every request whose first operation f rejects fail
// with f's error (nil f: no faults). For tests.
func (s *Server) InjectFault(f func(op kmip.Operation) error) {
	s.hookMu.Lock()
	s.failNow = f
	s.hookMu.Unlock()
}

// Close stops the server.
func (s *Server) Close() error {
	err := s.srv.Shutdown()
	<-s.done
	return err
}

func (s *Server) save() error {
	b, err := json.MarshalIndent(s.objs, "", "  ")
	if err != nil {
		return err
	}
	tmp := s.path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, s.path)
}

func (s *Server) find(id string) (*object, error) {
	for _, o := range s.objs {
		if o.ID == id {
			return o, nil
		}
	}
	return nil, kmipserver.Errorf(kmip.ResultReasonItemNotFound, "no object %q", id)
}

func nameOf(attrs []kmip.Attribute, names []kmip.Name) string {
	for _, n := range names {
		return n.NameValue
	}
	for _, a := range attrs {
		if a.AttributeName == kmip.AttributeNameName {
			switch v := a.AttributeValue.(type) {
			case kmip.Name:
				return v.NameValue
			case *kmip.Name:
				return v.NameValue
			}
		}
	}
	return ""
}

func (s *Server) create(ctx context.Context, req *payloads.CreateRequestPayload) (*payloads.CreateResponsePayload, error) {
	if req.ObjectType != kmip.ObjectTypeSymmetricKey {
		return nil, kmipserver.Errorf(kmip.ResultReasonOperationNotSupported, "only symmetric keys")
	}
	key := make([]byte, 32)
	rand.Read(key)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nextID++
	o := &object{ID: fmt.Sprintf("tdeshim-dev-%d", s.nextID), Name: nameOf(req.TemplateAttribute.Attribute, req.TemplateAttribute.Name),
		State: uint32(kmip.StatePreActive), Key: hex.EncodeToString(key), Created: time.Now().Unix()}
	s.objs = append(s.objs, o)
	if err := s.save(); err != nil {
		return nil, err
	}
	kmipserver.SetIdPlaceholder(ctx, o.ID)
	return &payloads.CreateResponsePayload{ObjectType: kmip.ObjectTypeSymmetricKey, UniqueIdentifier: o.ID}, nil
}

func (s *Server) transition(ctx context.Context, id string, from []kmip.State, to kmip.State, clearKey bool) (string, error) {
	id, err := kmipserver.GetIdOrPlaceholder(ctx, id)
	if err != nil {
		return "", err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	o, err := s.find(id)
	if err != nil {
		return "", err
	}
	ok := false
	for _, f := range from {
		ok = ok || kmip.State(o.State) == f
	}
	if !ok {
		return "", kmipserver.Errorf(kmip.ResultReasonIllegalOperation, "object %s is %v", id, kmip.State(o.State))
	}
	o.State = uint32(to)
	if clearKey {
		o.Key = ""
	}
	return id, s.save()
}

func (s *Server) activate(ctx context.Context, req *payloads.ActivateRequestPayload) (*payloads.ActivateResponsePayload, error) {
	id, err := s.transition(ctx, req.UniqueIdentifier, []kmip.State{kmip.StatePreActive}, kmip.StateActive, false)
	return &payloads.ActivateResponsePayload{UniqueIdentifier: id}, err
}

func (s *Server) revoke(ctx context.Context, req *payloads.RevokeRequestPayload) (*payloads.RevokeResponsePayload, error) {
	to := kmip.StateDeactivated
	if req.RevocationReason.RevocationReasonCode == kmip.RevocationReasonCodeKeyCompromise {
		to = kmip.StateCompromised
	}
	id, err := s.transition(ctx, req.UniqueIdentifier, []kmip.State{kmip.StatePreActive, kmip.StateActive, kmip.StateDeactivated}, to, false)
	return &payloads.RevokeResponsePayload{UniqueIdentifier: id}, err
}

func (s *Server) destroy(ctx context.Context, req *payloads.DestroyRequestPayload) (*payloads.DestroyResponsePayload, error) {
	id, err := s.transition(ctx, req.UniqueIdentifier, []kmip.State{kmip.StatePreActive, kmip.StateDeactivated, kmip.StateCompromised}, kmip.StateDestroyed, true)
	return &payloads.DestroyResponsePayload{UniqueIdentifier: id}, err
}

func (s *Server) locate(ctx context.Context, req *payloads.LocateRequestPayload) (*payloads.LocateResponsePayload, error) {
	want := nameOf(req.Attribute, nil)
	s.mu.Lock()
	defer s.mu.Unlock()
	resp := &payloads.LocateResponsePayload{}
	for _, o := range s.objs {
		if want == "" || o.Name == want {
			resp.UniqueIdentifier = append(resp.UniqueIdentifier, o.ID)
		}
	}
	n := int32(len(resp.UniqueIdentifier))
	resp.LocatedItems = &n
	return resp, nil
}

func (s *Server) keyOf(ctx context.Context, id string, states ...kmip.State) (*object, []byte, error) {
	id, err := kmipserver.GetIdOrPlaceholder(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	o, err := s.find(id)
	if err != nil {
		return nil, nil, err
	}
	ok := false
	for _, st := range states {
		ok = ok || kmip.State(o.State) == st
	}
	if !ok || o.Key == "" {
		return nil, nil, kmipserver.Errorf(kmip.ResultReasonPermissionDenied, "key %s is %v", id, kmip.State(o.State))
	}
	k, _ := hex.DecodeString(o.Key)
	return o, k, nil
}

func (s *Server) get(ctx context.Context, req *payloads.GetRequestPayload) (*payloads.GetResponsePayload, error) {
	o, k, err := s.keyOf(ctx, req.UniqueIdentifier, kmip.StateActive, kmip.StateDeactivated)
	if err != nil {
		return nil, err
	}
	return &payloads.GetResponsePayload{ObjectType: kmip.ObjectTypeSymmetricKey, UniqueIdentifier: o.ID,
		Object: &kmip.SymmetricKey{KeyBlock: kmip.KeyBlock{
			KeyFormatType: kmip.KeyFormatTypeRaw, CryptographicAlgorithm: kmip.CryptographicAlgorithmAES, CryptographicLength: 256,
			KeyValue: &kmip.KeyValue{Plain: &kmip.PlainKeyValue{KeyMaterial: kmip.KeyMaterial{Bytes: &k}}},
		}}}, nil
}

func (s *Server) getAttributes(ctx context.Context, req *payloads.GetAttributesRequestPayload) (*payloads.GetAttributesResponsePayload, error) {
	id, err := kmipserver.GetIdOrPlaceholder(ctx, req.UniqueIdentifier)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	o, err := s.find(id)
	if err != nil {
		return nil, err
	}
	return &payloads.GetAttributesResponsePayload{UniqueIdentifier: id, Attribute: []kmip.Attribute{
		{AttributeName: kmip.AttributeNameState, AttributeValue: kmip.State(o.State)},
		{AttributeName: kmip.AttributeNameName, AttributeValue: kmip.Name{NameValue: o.Name, NameType: kmip.NameTypeUninterpretedTextString}},
	}}, nil
}

func gcm(key []byte) (cipher.AEAD, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// gcmKey checks the parameters ask for AES-GCM and returns the active key
// id names, ready to use.
func (s *Server) gcmKey(ctx context.Context, id string, p *kmip.CryptographicParameters) (*object, cipher.AEAD, error) {
	if p != nil && p.BlockCipherMode != 0 && p.BlockCipherMode != kmip.BlockCipherModeGCM {
		return nil, nil, kmipserver.Errorf(kmip.ResultReasonOperationNotSupported, "only AES-GCM")
	}
	o, k, err := s.keyOf(ctx, id, kmip.StateActive)
	if err != nil {
		return nil, nil, err
	}
	a, err := gcm(k)
	return o, a, err
}

func (s *Server) encrypt(ctx context.Context, req *payloads.EncryptRequestPayload) (*payloads.EncryptResponsePayload, error) {
	o, a, err := s.gcmKey(ctx, req.UniqueIdentifier, req.CryptographicParameters)
	if err != nil {
		return nil, err
	}
	iv := req.IVCounterNonce
	if len(iv) == 0 {
		iv = make([]byte, 12)
		rand.Read(iv)
	}
	if len(iv) != 12 {
		return nil, kmipserver.Errorf(kmip.ResultReasonInvalidField, "IV must be 12 bytes")
	}
	out := a.Seal(nil, iv, req.Data, req.AuthenticatedEncryptionAdditionalData)
	n := len(out) - 16
	return &payloads.EncryptResponsePayload{UniqueIdentifier: o.ID, Data: out[:n], IVCounterNonce: iv, AuthenticatedEncryptionTag: out[n:]}, nil
}

func (s *Server) decrypt(ctx context.Context, req *payloads.DecryptRequestPayload) (*payloads.DecryptResponsePayload, error) {
	o, a, err := s.gcmKey(ctx, req.UniqueIdentifier, req.CryptographicParameters)
	if err != nil {
		return nil, err
	}
	if len(req.IVCounterNonce) != 12 {
		return nil, kmipserver.Errorf(kmip.ResultReasonInvalidField, "IV must be 12 bytes")
	}
	pt, err := a.Open(nil, req.IVCounterNonce, append(append([]byte(nil), req.Data...), req.AuthenticatedEncryptionTag...), req.AuthenticatedEncryptionAdditionalData)
	if err != nil {
		return nil, kmipserver.Errorf(kmip.ResultReasonCryptographicFailure, "authentication failed")
	}
	return &payloads.DecryptResponsePayload{UniqueIdentifier: o.ID, Data: pt}, nil
}
