package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/tdeshim/tdeshim/internal/scan"
)

const pgBin = "/usr/lib/postgresql/15/bin"

var nextPort atomic.Int32

func init() { nextPort.Store(56100) }

// needPG skips (or in CI fails) without PostgreSQL 15 and root.
func needPG(t *testing.T) {
	t.Helper()
	needRoot(t)
	need(t, pgBin+"/initdb", "mkfs.ext4", "nbdfuse", "losetup", "fusermount3")
	if _, err := exec.LookPath("runuser"); err != nil {
		t.Skip("no runuser")
	}
}

// worldDir is a fresh directory PostgreSQL (running as postgres) can
// traverse, removed at cleanup.
func worldDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("/var/tmp", "tdeshim-pg-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(d, 0o755)
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// stack is a volume brought up with `tdeshim up`.
type stack struct {
	name, vol, mnt, runDir string
	serveArgs              []string
	noWatch                bool // volume key only (up --no-watch)
}

func newStack(t *testing.T, dir, name string, serveArgs ...string) *stack {
	t.Helper()
	return newStackWith(t, &stack{name: name, vol: filepath.Join(dir, name+".vol"), mnt: filepath.Join(dir, name+".mnt"), runDir: filepath.Join(dir, "run"), serveArgs: serveArgs})
}

func newStackWith(t *testing.T, s *stack) *stack {
	t.Helper()
	name := s.name
	// Keys from an independent KMIP server (PyKMIP), as in production.
	k := sharedPyKMS(t)
	mustRun(t, time.Minute, tdeshimBin, append([]string{"init", "--volume", s.vol, "--size", "2G", "--key-provider", "kmip",
		"--principal-key", fmt.Sprintf("%s-%d", name, time.Now().UnixNano()), "--create-principal-key"}, k.flags()...)...)
	s.up(t)
	t.Cleanup(func() { s.forceDown(t) })
	return s
}

func (s *stack) up(t *testing.T) {
	t.Helper()
	args := []string{"up", "--volume", s.vol, "--mount", s.mnt, "--name", s.name, "--run-dir", s.runDir, "--owner", "postgres"}
	if s.noWatch {
		args = append(args, "--no-watch")
	}
	for _, a := range s.serveArgs {
		args = append(args, "--serve-arg", a)
	}
	mustRun(t, 2*time.Minute, tdeshimBin, args...)
}

func (s *stack) down(t *testing.T) {
	t.Helper()
	mustRun(t, 2*time.Minute, tdeshimBin, "down", "--name", s.name, "--run-dir", s.runDir)
}

type upState struct {
	Device string `json:"device"`
	PID    int    `json:"serve_pid"`
	Log    string `json:"serve_log"`
}

func (s *stack) state(t *testing.T) upState {
	var st upState
	b, err := os.ReadFile(filepath.Join(s.runDir, s.name+".up.json"))
	if err == nil {
		json.Unmarshal(b, &st)
	}
	return st
}

// killServe is a crash of the server process (SIGKILL).
func (s *stack) killServe(t *testing.T) {
	st := s.state(t)
	if st.PID > 0 {
		syscall.Kill(st.PID, syscall.SIGKILL)
		for i := 0; i < 100 && syscall.Kill(st.PID, 0) == nil; i++ {
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// forceDown releases everything whatever state it is in: for cleanup.
func (s *stack) forceDown(t *testing.T) {
	if _, err := os.Stat(filepath.Join(s.runDir, s.name+".up.json")); err != nil {
		return
	}
	st := s.state(t)
	if out, err := run(t, 2*time.Minute, tdeshimBin, "down", "--name", s.name, "--run-dir", s.runDir); err == nil {
		return
	} else {
		t.Logf("down failed, forcing: %v %s", err, out)
	}
	exec.Command("umount", "-l", s.mnt).Run()
	exec.Command("losetup", "-d", st.Device).Run()
	exec.Command("fusermount3", "-u", filepath.Join(s.runDir, s.name+".fuse")).Run()
	exec.Command("umount", "-l", filepath.Join(s.runDir, s.name+".fuse")).Run()
	if st.PID > 0 {
		syscall.Kill(st.PID, syscall.SIGKILL)
	}
	os.Remove(filepath.Join(s.runDir, s.name+".up.json"))
}

// pg is a PostgreSQL 15 cluster started by a test.
type pg struct {
	data, sock string
	port       int
}

func asPostgres(t *testing.T, timeout time.Duration, args ...string) (string, error) {
	return run(t, timeout, "runuser", append([]string{"-u", "postgres", "--"}, args...)...)
}

// initPG runs initdb (data checksums) in dir/pgdata and starts it.
func initPG(t *testing.T, dir string, extra ...string) *pg {
	t.Helper()
	return initPGOn(t, dir, int(nextPort.Add(1)), extra...)
}

// initPGOn is initPG on a port reserved beforehand (nextPort.Add), for a
// serve that must know where PostgreSQL will listen (--dsn).
func initPGOn(t *testing.T, dir string, port int, extra ...string) *pg {
	t.Helper()
	p := &pg{data: filepath.Join(dir, "pgdata"), sock: filepath.Join(dir, "sock"), port: port}
	os.MkdirAll(p.sock, 0o755)
	exec.Command("chown", "postgres:", p.sock, dir).Run()
	if out, err := asPostgres(t, 2*time.Minute, pgBin+"/initdb", "-D", p.data, "--data-checksums", "-U", "postgres", "--auth=trust"); err != nil {
		t.Fatalf("initdb: %v\n%s", err, out)
	}
	p.start(t, extra...)
	t.Cleanup(func() { p.stopIfRunning(t) })
	return p
}

func (p *pg) start(t *testing.T, extra ...string) {
	t.Helper()
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses='' -c logging_collector=on -c log_directory=log -c log_temp_files=0 -c wal_level=replica -c max_wal_senders=4 %s", p.port, p.sock, strings.Join(extra, " "))
	if out, err := asPostgres(t, 3*time.Minute, pgBin+"/pg_ctl", "-D", p.data, "-o", opts, "-w", "-t", "170", "-l", filepath.Join(filepath.Dir(p.data), "startup.log"), "start"); err != nil {
		b, _ := os.ReadFile(filepath.Join(filepath.Dir(p.data), "startup.log"))
		logs, _ := filepath.Glob(filepath.Join(p.data, "log", "*"))
		var last []byte
		if len(logs) > 0 {
			last, _ = os.ReadFile(logs[len(logs)-1])
			if len(last) > 4000 {
				last = last[len(last)-4000:]
			}
		}
		t.Fatalf("pg_ctl start: %v\n%s\n%s\nserver log:\n%s", err, out, b, last)
	}
}

func (p *pg) stop(t *testing.T, mode string) {
	t.Helper()
	if out, err := asPostgres(t, 2*time.Minute, pgBin+"/pg_ctl", "-D", p.data, "-m", mode, "-w", "stop"); err != nil {
		t.Fatalf("pg_ctl stop: %v\n%s", err, out)
	}
}

func (p *pg) stopIfRunning(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(p.data, "postmaster.pid"))
	if err != nil {
		return
	}
	first, _, _ := strings.Cut(string(b), "\n")
	pid, _ := strconv.Atoi(strings.TrimSpace(first))
	if pid > 0 && syscall.Kill(pid, 0) == nil {
		asPostgres(t, time.Minute, pgBin+"/pg_ctl", "-D", p.data, "-m", "immediate", "-w", "stop")
		if syscall.Kill(pid, 0) == nil {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// sql runs statements and returns unaligned, tuples-only output.
func (p *pg) sql(t *testing.T, db, sql string) string {
	t.Helper()
	out, err := p.trySQL(t, db, sql)
	if err != nil {
		t.Fatalf("psql: %v\n%s\nSQL: %s", err, out, sql)
	}
	return strings.TrimSpace(out)
}

// trySQL feeds the statements on standard input, so each one commits on
// its own (psql -c would wrap them in one transaction).
func (p *pg) trySQL(t *testing.T, db, sql string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "runuser", "-u", "postgres", "--", "psql", "-X", "-At", "-q", "-v", "ON_ERROR_STOP=1",
		"-h", p.sock, "-p", strconv.Itoa(p.port), "-U", "postgres", "-d", db, "-f", "-")
	cmd.Stdin = strings.NewReader(sql)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (p *pg) pgbench(t *testing.T, args ...string) string {
	t.Helper()
	out, err := asPostgres(t, 10*time.Minute, append([]string{"pgbench", "-h", p.sock, "-p", strconv.Itoa(p.port), "-U", "postgres"}, args...)...)
	if err != nil {
		t.Fatalf("pgbench %v: %v\n%s", args, err, out)
	}
	return out
}

func (p *pg) amcheck(t *testing.T) {
	t.Helper()
	out, err := asPostgres(t, 10*time.Minute, pgBin+"/pg_amcheck", "-h", p.sock, "-p", strconv.Itoa(p.port), "-U", "postgres",
		"--all", "--install-missing", "--heapallindexed")
	if err != nil {
		t.Fatalf("pg_amcheck found problems: %v\n%s", err, out)
	}
}

// countInFile counts occurrences of s in the file (or device) at path.
func countInFile(t *testing.T, path, s string) int {
	n, err := scan.Count(path, []byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return n
}
