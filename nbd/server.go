package nbd

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"
)

// Options configure a Server.
type Options struct {
	ExportName  string // default export; "" from a client also selects it
	Description string
	// MaxPayload bounds READ and WRITE lengths (default 32 MiB).
	MaxPayload uint32
	// MaxInFlight bounds concurrent requests per connection (default 128);
	// beyond it the server simply stops reading until one completes.
	MaxInFlight int
	Logger      *slog.Logger
}

// Block size constraints advertised with NBD_INFO_BLOCK_SIZE. The minimum
// is a sector: smaller-than-block writes are read-modify-written.
const (
	MinBlock       = 512
	PreferredBlock = 4096
	defaultPayload = 32 << 20
	maxOptionLen   = 64 << 10
	maxOptions     = 1024
	maxExtents     = 1 << 16
)

// Server serves one Device to many connections.
type Server struct {
	dev   Device
	opt   Options
	log   *slog.Logger
	mu    sync.Mutex
	lns   []net.Listener
	conns map[*conn]struct{}
	wg    sync.WaitGroup
	down  bool
}

// NewServer returns a server for dev.
func NewServer(dev Device, opt Options) *Server {
	if opt.MaxPayload == 0 {
		opt.MaxPayload = defaultPayload
	}
	if opt.MaxInFlight <= 0 {
		opt.MaxInFlight = 128
	}
	if opt.ExportName == "" {
		opt.ExportName = "tdeshim"
	}
	if opt.Logger == nil {
		opt.Logger = slog.Default()
	}
	return &Server{dev: dev, opt: opt, log: opt.Logger, conns: map[*conn]struct{}{}}
}

// Serve accepts connections on ln until Shutdown. It returns nil after a
// shutdown and the accept error otherwise.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.down {
		s.mu.Unlock()
		ln.Close()
		return nil
	}
	s.lns = append(s.lns, ln)
	s.mu.Unlock()
	var delay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			down := s.down
			s.mu.Unlock()
			if down {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				time.Sleep(delay)
				continue
			}
			return err
		}
		delay = 0
		c := &conn{srv: s, nc: nc, rfd: -1, log: s.log.With("remote", nc.RemoteAddr().String())}
		s.mu.Lock()
		if s.down {
			s.mu.Unlock()
			nc.Close()
			return nil
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			c.serve()
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
		}()
	}
}

// ServeConn serves one already-accepted connection (socket activation,
// tests) and returns when it ends.
func (s *Server) ServeConn(nc net.Conn) {
	c := &conn{srv: s, nc: nc, rfd: -1, log: s.log}
	s.mu.Lock()
	if s.down {
		s.mu.Unlock()
		nc.Close()
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()
	c.serve()
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// Shutdown stops accepting, lets every connection finish the requests it
// has read (new ones get ESHUTDOWN), and flushes the device. It returns
// when all connections are gone or ctx ends.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.down = true
	for _, ln := range s.lns {
		ln.Close()
	}
	for c := range s.conns {
		c.stop()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.conns {
			c.nc.Close()
		}
		s.mu.Unlock()
		<-done
	}
	return s.dev.Flush()
}

// Connections is the number of open connections.
func (s *Server) Connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}
