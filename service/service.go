// Package service assembles a running tdeshim server: it opens the volume,
// exports it over NBD on the configured listeners, hardens the process,
// tells systemd when it is ready, and on cancellation drains, flushes and
// closes the volume. The tdeshim binary and the end-to-end tests share it.
package service

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tdeshim/tdeshim/catalog"
	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/nbd"
	"github.com/tdeshim/tdeshim/store"
	"github.com/tdeshim/tdeshim/volume"
	"github.com/tdeshim/tdeshim/walwatch"
)

// Config is what serve needs; everything else comes from the volume header.
type Config struct {
	Volume   string
	Listen   []string // unix:PATH or tcp:HOST:PORT
	ReadOnly bool
	// AllowRemotePlaintext permits TCP on non-loopback addresses. What
	// crosses an NBD connection is plaintext.
	AllowRemotePlaintext bool
	Provider             keys.Provider // overrides the header's provider
	Logger               *slog.Logger
	// Ready, if set, is called once every listener accepts connections.
	Ready func(addrs []string)
	// KMSCheckInterval: how often the principal keys are checked in the
	// KMS; a revoked or destroyed key suspends the volume. 0 disables.
	KMSCheckInterval time.Duration
	// ControlDir holds the control socket (default /run/tdeshim).
	ControlDir string
	// VolatileCacheModel keeps writes in memory until a flush, so SIGKILL
	// loses what a power cut would. For power-loss tests only.
	VolatileCacheModel bool
	// Watch is where the volume's filesystem is (or will be) mounted:
	// per-relation and WAL keys follow its files. Empty: volume key only.
	Watch string
	// RekeyRate bounds the rekeyer (bytes per second; 0 = unlimited).
	RekeyRate int64
	// ShredGrace: how long a relfilenode's files must be gone before its
	// key is destroyed (negative: never automatically).
	ShredGrace time.Duration
	// DSN, if set, is a PostgreSQL connection (catalog package): relation
	// names in status, and the catalog must agree a relfilenode is gone
	// before its key is shredded.
	DSN string
}

// Run serves until ctx is cancelled, then drains in-flight requests,
// flushes, marks the volume clean and returns.
func Run(ctx context.Context, cfg Config) error {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if len(cfg.Listen) == 0 {
		return errors.New("serve: no --listen address given (unix:/run/tdeshim/NAME.sock or tcp:127.0.0.1:10809)")
	}
	if err := keys.HardenProcess(); err != nil {
		log.Warn("cannot make the process non-dumpable", "err", err)
	}
	// Local writeback through our own export (loop device, mounted ext4)
	// must not wait on memory reclaim that waits on us.
	if err := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0); err != nil {
		log.Warn("PR_SET_IO_FLUSHER not set; under heavy memory pressure local writeback could stall (needs CAP_SYS_RESOURCE)", "err", err)
	}
	f, err := store.OpenFile(cfg.Volume, cfg.ReadOnly)
	if err != nil {
		return fmt.Errorf("serve: open %s: %w", cfg.Volume, err)
	}
	defer f.Close()
	var st store.Store = f
	if cfg.VolatileCacheModel {
		log.Warn("UNSAFE: modelling a volatile write cache; unflushed writes are lost on kill (power-loss tests only)")
		st = store.NewVolatile(f)
	}
	vol, err := openWithRetry(ctx, st, cfg, log)
	if err != nil {
		return fmt.Errorf("serve: %s: %w", cfg.Volume, err)
	}
	if vol.Provider().Development() {
		log.Warn(keys.FileProviderWarning)
	}
	h := vol.Header()
	log.Info("volume open", "volume", cfg.Volume, "uuid", fmt.Sprintf("%x", h.UUID), "size", vol.Size(),
		"engine", vol.Engine(), "read_only", cfg.ReadOnly)

	srv := nbd.NewServer(Device{vol}, nbd.Options{
		ExportName:  "tdeshim",
		Description: fmt.Sprintf("tdeshim volume %x", h.UUID[:8]),
		Logger:      log,
	})
	var lns []net.Listener
	var addrs []string
	for _, spec := range cfg.Listen {
		ln, err := Listen(spec, cfg.AllowRemotePlaintext)
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			vol.Close()
			return err
		}
		lns = append(lns, ln)
		addrs = append(addrs, spec)
	}
	health := &Health{}
	// The watcher and the rekeyer stop before the volume closes.
	bgCtx, bgStop := context.WithCancel(ctx)
	var bg sync.WaitGroup
	defer func() { bgStop(); bg.Wait() }()
	var watcher *walwatch.Watcher
	var cat *catalog.Catalog
	if cfg.DSN != "" {
		if cat, err = catalog.New(cfg.DSN, log); err != nil {
			vol.Close()
			return err
		}
	}
	if !cfg.ReadOnly {
		if cfg.Watch != "" {
			wc := walwatch.Config{Mount: cfg.Watch, Volume: vol, Logger: log, ShredGrace: cfg.ShredGrace}
			if cat != nil {
				wc.Catalog = cat
			}
			watcher = walwatch.New(wc)
			bg.Add(1)
			go func() { defer bg.Done(); watcher.Run(bgCtx) }()
		}
		bg.Add(1)
		go func() {
			defer bg.Done()
			vol.RunRekeyer(bgCtx, volume.RekeyOptions{Rate: cfg.RekeyRate})
		}()
	}
	ctl, err := startControl(ctx, cfg, controlDeps{vol: vol, srv: srv, h: health, watch: watcher, cat: cat, log: log})
	if err != nil {
		log.Warn("no control socket; online key rotation and live status are unavailable", "err", err)
	} else {
		defer ctl.Close()
	}
	if cfg.KMSCheckInterval > 0 {
		go watchKMS(ctx, vol, cfg.KMSCheckInterval, health, log)
	}
	errc := make(chan error, len(lns))
	for _, ln := range lns {
		go func(ln net.Listener) { errc <- srv.Serve(ln) }(ln)
		log.Info("serving NBD", "listen", ln.Addr().String())
	}
	if cfg.Ready != nil {
		cfg.Ready(addrs)
	}
	var serveErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down: draining requests")
	case serveErr = <-errc:
		log.Error("listener failed", "err", serveErr)
	}
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil && serveErr == nil {
		serveErr = err
	}
	for _, ln := range lns {
		if u, ok := ln.Addr().(*net.UnixAddr); ok {
			os.Remove(u.Name)
		}
	}
	bgStop()
	bg.Wait()
	if err := vol.Close(); err != nil && serveErr == nil {
		serveErr = err
	}
	if serveErr == nil {
		log.Info("volume closed cleanly")
	}
	return serveErr
}

// openWithRetry opens the volume; while the KMS is unreachable it retries
// with backoff (and says so) rather than failing or serving anything.
func openWithRetry(ctx context.Context, st store.Store, cfg Config, log *slog.Logger) (*volume.Volume, error) {
	delay := time.Second
	for {
		vol, err := volume.Open(ctx, st, volume.Options{ReadOnly: cfg.ReadOnly, Provider: cfg.Provider, Logger: log})
		if err == nil || !errors.Is(err, keys.ErrKMSUnreachable) {
			return vol, err
		}
		log.Warn("KMS unreachable; not serving until the keys can be unwrapped", "retry_in", delay.String(), "err", err)
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("gave up waiting for the KMS: %w", err)
		case <-time.After(delay):
		}
		delay = min(2*delay, time.Minute)
	}
}

// Health is what serve knows about its KMS, for status.
type Health struct {
	mu        sync.Mutex
	KMS       string    `json:"kms"`
	CheckedAt time.Time `json:"checked_at"`
}

func (h *Health) set(s string) {
	h.mu.Lock()
	h.KMS, h.CheckedAt = s, time.Now().UTC()
	h.mu.Unlock()
}

func (h *Health) get() (string, time.Time) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.KMS, h.CheckedAt
}

// watchKMS checks the principal keys every interval. Unreachable: keep
// serving from the keys in memory, warn. Revoked, destroyed or gone:
// suspend the volume (wipe keys, fail I/O) until an operator restarts it.
func watchKMS(ctx context.Context, vol *volume.Volume, every time.Duration, h *Health, log *slog.Logger) {
	h.set("ok")
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		bad := vol.CheckPrincipals(cctx)
		cancel()
		status := "ok"
		for _, pe := range bad {
			switch {
			case volume.IsRevoked(pe.Err) && len(pe.Database) == 0:
				h.set("suspended: " + pe.Err.Error())
				vol.Suspend(pe.Err)
				return
			case volume.IsRevoked(pe.Err):
				vol.SuspendPrincipal(pe.Entry, pe.Err)
				status = fmt.Sprintf("ok; principal key of database(s) %v revoked: those databases are unreadable", pe.Database)
			default:
				status = "unreachable: " + pe.Err.Error()
				log.Warn("KMS check failed; serving on with the keys in memory", "err", pe.Err)
			}
		}
		h.set(status)
	}
}

// Listen opens a listener from unix:PATH or tcp:HOST:PORT. Unix sockets
// are mode 0600; TCP is refused off loopback unless allowRemote.
func Listen(spec string, allowRemote bool) (net.Listener, error) {
	kind, addr, ok := strings.Cut(spec, ":")
	if !ok {
		return nil, fmt.Errorf("listen %q: want unix:PATH or tcp:HOST:PORT", spec)
	}
	switch kind {
	case "unix":
		if c, err := net.Dial("unix", addr); err == nil {
			c.Close()
			return nil, fmt.Errorf("listen %s: a server is already running on this socket", addr)
		}
		os.Remove(addr) // stale socket from a crash
		old := unix.Umask(0o177)
		ln, err := net.Listen("unix", addr)
		unix.Umask(old)
		if err != nil {
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
		if err := os.Chmod(addr, 0o600); err != nil {
			ln.Close()
			return nil, err
		}
		return ln, nil
	case "tcp":
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, fmt.Errorf("listen %q: %w", spec, err)
		}
		if !allowRemote {
			ip, err := netip.ParseAddr(host)
			if host == "localhost" {
				ip, err = netip.MustParseAddr("127.0.0.1"), nil
			}
			if err != nil || !ip.IsLoopback() {
				return nil, fmt.Errorf("listen %s: refusing to serve plaintext blocks on a non-loopback address; bind 127.0.0.1 or pass --allow-remote-plaintext (and protect the network path yourself)", addr)
			}
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("listen %s: %w", addr, err)
		}
		return ln, nil
	}
	return nil, fmt.Errorf("listen %q: unknown kind %q (unix or tcp)", spec, kind)
}

// Device adapts a volume to the nbd.Device interface and maps its errors
// to NBD error codes.
type Device struct{ V *volume.Volume }

func (d Device) Size() int64    { return d.V.Size() }
func (d Device) ReadOnly() bool { return d.V.ReadOnly() }

func (d Device) ReadAt(p []byte, off int64) error { return mapErr(d.V.ReadAt(p, off)) }
func (d Device) WriteAt(p []byte, off int64, fua bool) error {
	return mapErr(d.V.WriteAt(p, off, fua))
}
func (d Device) Trim(off, n int64, fua bool) error { return mapErr(d.V.Trim(off, n, fua)) }
func (d Device) Zero(off, n int64, noHole, fast, fua bool) error {
	return mapErr(d.V.Zero(off, n, noHole, fast, fua))
}
func (d Device) Flush() error { return mapErr(d.V.Flush()) }

func (d Device) Extents(off, n int64, max int) ([]nbd.Extent, error) {
	es, err := d.V.Status(off, n, max)
	if err != nil {
		return nil, mapErr(err)
	}
	out := make([]nbd.Extent, len(es))
	for i, e := range es {
		out[i] = nbd.Extent{Length: e.Length, Hole: e.Free}
	}
	return out, nil
}

func mapErr(err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, volume.ErrReadOnly):
		return &nbd.Error{Code: nbd.EPERM, Err: err}
	case errors.Is(err, volume.ErrNotFast):
		return &nbd.Error{Code: nbd.ENOTSUP, Err: err}
	case errors.Is(err, volume.ErrRange), errors.Is(err, volume.ErrAlign):
		return &nbd.Error{Code: nbd.EINVAL, Err: err}
	case volume.IsNoSpace(err):
		return &nbd.Error{Code: nbd.ENOSPC, Err: err}
	}
	return &nbd.Error{Code: nbd.EIO, Err: err}
}

// NotifySystemd sends state (e.g. "READY=1") to $NOTIFY_SOCKET, if set.
func NotifySystemd(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if strings.HasPrefix(path, "@") {
		path = "\x00" + path[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return err
	}
	defer c.Close()
	_, err = c.Write([]byte(state))
	return err
}
