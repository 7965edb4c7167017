package service

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tdeshim/tdeshim/catalog"
	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/nbd"
	"github.com/tdeshim/tdeshim/volume"
	"github.com/tdeshim/tdeshim/walwatch"
)

// The control socket lets tdeshim commands act on a volume that a running
// serve holds (it keeps the volume locked): live status, online principal
// rotation. One JSON request line, one JSON reply line. Mode 0600, root's
// only: rotation names key files and KMS credentials.

// DefaultControlDir is where serve puts control sockets.
const DefaultControlDir = "/run/tdeshim"

// ControlPath is the control socket of the volume with this UUID.
func ControlPath(dir string, uuid [16]byte) string {
	if dir == "" {
		dir = DefaultControlDir
		if d := os.Getenv("TDESHIM_CONTROL_DIR"); d != "" {
			dir = d
		}
	}
	return filepath.Join(dir, fmt.Sprintf("%x.ctl", uuid[:8]))
}

// ControlRequest is one command.
type ControlRequest struct {
	Op string `json:"op"` // "state" or "rotate-principal"
	// rotate-principal: the new principal key's settings, and whether to
	// create it in the KMS.
	Principal keys.Config `json:"principal,omitempty"`
	Create    bool        `json:"create,omitempty"`
	// state: include the per-key report (status --relations).
	Relations bool `json:"relations,omitempty"`
	// rotate-keys and shred: which keys.
	Target *KeyTarget `json:"target,omitempty"`
	// set-principal: the database that gets Principal as its own key.
	Database uint32 `json:"database,omitempty"`
}

// KeyTarget selects data keys for rotate-keys and shred.
type KeyTarget struct {
	Relation  *layout.RelKey `json:"relation,omitempty"`
	Database  *uint32        `json:"database,omitempty"`
	WAL       bool           `json:"wal,omitempty"`
	VolumeKey bool           `json:"volume_key,omitempty"`
	All       bool           `json:"all,omitempty"`
	// Force shreds a relation whose files still exist (its blocks move
	// to a new key; copies made before are unreadable).
	Force bool `json:"force,omitempty"`
}

// Select reports whether an active slot is one the target names.
func (t *KeyTarget) Select(sl layout.Slot) bool {
	switch {
	case t.All:
		return true
	case t.WAL:
		return sl.Kind == layout.KindWAL
	case t.VolumeKey:
		return sl.Kind == layout.KindVolume
	case t.Database != nil:
		return sl.Kind == layout.KindRelation && sl.Database == *t.Database
	case t.Relation != nil:
		return sl.Kind == layout.KindRelation && sl.Tablespace == t.Relation.Tablespace &&
			sl.Database == t.Relation.Database && sl.RelNode == t.Relation.RelNode
	}
	return false
}

// ControlReply is the answer.
type ControlReply struct {
	Error       string            `json:"error,omitempty"`
	KMS         string            `json:"kms,omitempty"`
	KMSChecked  time.Time         `json:"kms_checked_at,omitzero"`
	Suspended   bool              `json:"suspended"`
	Connections int               `json:"connections"`
	Stats       map[string]uint64 `json:"stats,omitempty"`
	Usage       map[uint32]uint64 `json:"blocks_by_slot,omitempty"`
	Principal   keys.Config       `json:"principal"`
	Rekey       volume.RekeyStats `json:"rekey"`
	Keys        *volume.KeyReport `json:"keys,omitempty"`
	Watch       *walwatch.Status  `json:"watch,omitempty"`
	Retired     []uint32          `json:"retired_slots,omitempty"`
	Rewrapped   int               `json:"rewrapped,omitempty"`
	// SuspendedPrincipals: database principal keys found revoked.
	SuspendedPrincipals map[uint16]string `json:"suspended_principals,omitempty"`
	Databases           map[uint32]uint16 `json:"database_principals,omitempty"`
}

type control struct{ ln net.Listener }

// controlDeps is what control requests act on.
type controlDeps struct {
	vol   *volume.Volume
	srv   *nbd.Server
	h     *Health
	watch *walwatch.Watcher // nil without --watch
	cat   *catalog.Catalog  // nil without --dsn
	log   *slog.Logger
}

func (c *control) Close() error {
	os.Remove(c.ln.Addr().String())
	return c.ln.Close()
}

func startControl(ctx context.Context, cfg Config, d controlDeps) (*control, error) {
	path := ControlPath(cfg.ControlDir, d.vol.Header().UUID)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	os.Remove(path)
	old := unix.Umask(0o177)
	ln, err := net.Listen("unix", path)
	unix.Umask(old)
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go handleControl(ctx, c, d)
		}
	}()
	return &control{ln: ln}, nil
}

func handleControl(ctx context.Context, c net.Conn, d controlDeps) {
	defer c.Close()
	vol, log := d.vol, d.log
	var req ControlRequest
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &req)
	}
	rep := ControlReply{}
	switch {
	case err != nil:
		rep.Error = "bad request: " + err.Error()
	case req.Op == "state":
	case req.Op == "reset-stats":
		vol.ResetRekeyStats()
	case req.Op == "rotate-principal":
		log.Info("rotating principal key online", "provider", req.Principal.Provider, "principal", req.Principal.Principal)
		err = rotate(ctx, vol, req.Principal, req.Create)
		if err != nil {
			rep.Error = err.Error()
		}
	case req.Op == "set-principal" && req.Database != 0:
		log.Info("giving a database its own principal key", "database", req.Database, "principal", req.Principal.Principal)
		var p keys.Provider
		if p, err = OpenProvider(ctx, req.Principal, req.Create); err == nil {
			rep.Rewrapped, err = vol.SetDatabasePrincipal(ctx, req.Database, p)
		}
		if err != nil {
			rep.Error = err.Error()
		}
	case req.Op == "rotate-keys" && req.Target != nil:
		rep.Retired, err = vol.RotateKeys(ctx, func(_ uint32, sl layout.Slot) bool { return req.Target.Select(sl) })
		if err != nil {
			rep.Error = err.Error()
		}
		log.Info("rotating data keys online", "keys", len(rep.Retired))
	case req.Op == "shred" && req.Target != nil && req.Target.Relation != nil:
		rep.Retired, err = shred(ctx, d, *req.Target)
		if err != nil {
			rep.Error = err.Error()
		}
	default:
		rep.Error = fmt.Sprintf("unknown or incomplete op %q", req.Op)
	}
	rep.KMS, rep.KMSChecked = d.h.get()
	rep.Suspended = vol.Suspended()
	rep.Connections = d.srv.Connections()
	rep.Rekey = vol.RekeyStatsSnapshot()
	rep.SuspendedPrincipals = vol.SuspendedPrincipals()
	rep.Databases = vol.Principals().Databases
	if req.Relations {
		kr := vol.KeyReport()
		if d.cat != nil {
			for i := range kr.Relations {
				r := &kr.Relations[i]
				if n, ok := d.cat.Name(layout.RelKey{Tablespace: r.TablespaceOID, Database: r.DatabaseOID, RelNode: r.RelFileNode}); ok {
					r.Name = &n
				}
			}
		}
		rep.Keys = &kr
	}
	if d.watch != nil {
		ws := d.watch.Status()
		rep.Watch = &ws
	}
	rep.Stats = vol.StatsSnapshot()
	rep.Usage = vol.Usage()
	if p := vol.Provider(); p != nil {
		rep.Principal = p.Config()
	}
	json.NewEncoder(c).Encode(rep)
}

// shred retires a relation's key now, without a successor; refused while
// the watcher sees its files, unless forced.
func shred(ctx context.Context, d controlDeps, t KeyTarget) ([]uint32, error) {
	rel := *t.Relation
	s := d.vol.RelationSlot(rel)
	if s == 0 {
		return nil, fmt.Errorf("relation %s has no active key (already shredded, or never seen)", rel)
	}
	if ix := d.vol.Index(); ix != nil && !t.Force {
		if n, ok := ix.Relations()[rel]; ok {
			return nil, fmt.Errorf("relation %s still has files (%d blocks): drop it in PostgreSQL first, or pass --force (its data moves to a new key)", rel, n)
		}
	}
	if err := d.vol.Retire(ctx, s, false); err != nil {
		return nil, err
	}
	d.log.Info("crypto-shredding on request", "relation", rel.String(), "slot", s)
	return []uint32{s}, nil
}

// OpenProvider opens a provider from settings; for KMIP, create makes and
// activates the key if it does not exist.
func OpenProvider(ctx context.Context, c keys.Config, create bool) (keys.Provider, error) {
	if c.Provider == "kmip" {
		return keys.OpenKMIP(ctx, keys.KMIPSettingsFrom(c), create)
	}
	return keys.Open(ctx, c)
}

func rotate(ctx context.Context, vol *volume.Volume, c keys.Config, create bool) error {
	p, err := OpenProvider(ctx, c, create)
	if err != nil {
		return err
	}
	if err := vol.RotatePrincipal(ctx, p, nil); err != nil {
		return err
	}
	return nil
}

// Ask sends one request to the control socket at path.
func Ask(path string, req ControlRequest, timeout time.Duration) (*ControlReply, error) {
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	b, _ := json.Marshal(req)
	if _, err := c.Write(append(b, '\n')); err != nil {
		return nil, err
	}
	var rep ControlReply
	if err := json.NewDecoder(c).Decode(&rep); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if rep.Error != "" {
		return &rep, errors.New(rep.Error)
	}
	return &rep, nil
}
