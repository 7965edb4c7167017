package e2e

import (
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestStandardToolsOnEncryptedPrimary: the tools pg_tde breaks work
// unchanged here, because nothing above the block device changes:
// pg_basebackup to a second tdeshim volume that then streams as a standby,
// pg_waldump on the mounted WAL, pg_rewind after a promotion, and
// pg_checksums --check.
func TestStandardToolsOnEncryptedPrimary(t *testing.T) {
	needPG(t)
	dir := worldDir(t)
	a := newStack(t, dir, "primary")
	b := newStack(t, dir, "standby")
	pa := initPG(t, a.mnt, "-c wal_log_hints=on -c wal_keep_size=256MB")
	pa.sql(t, "postgres", "CREATE TABLE facts (id int PRIMARY KEY, v text); INSERT INTO facts SELECT g, 'before-' || g FROM generate_series(1, 1000) g;")

	// pg_basebackup onto the second encrypted volume, as a standby.
	pb := &pg{data: filepath.Join(b.mnt, "pgdata"), sock: filepath.Join(b.mnt, "sock"), port: int(nextPort.Add(1))}
	os.MkdirAll(pb.sock, 0o755)
	runOK(t, "chown", "postgres:", pb.sock)
	if out, err := asPostgres(t, 5*time.Minute, pgBin+"/pg_basebackup", "-h", pa.sock, "-p", strconv.Itoa(pa.port), "-U", "postgres",
		"-D", pb.data, "-R", "-X", "stream", "-c", "fast"); err != nil {
		t.Fatalf("pg_basebackup: %v\n%s", err, out)
	}
	pb.start(t, "-c wal_log_hints=on")
	t.Cleanup(func() { pb.stopIfRunning(t) })
	pa.sql(t, "postgres", "INSERT INTO facts SELECT g, 'streamed-' || g FROM generate_series(1001, 2000) g;")
	waitFor(t, 60*time.Second, "standby replays the primary", func() bool {
		out, err := pb.trySQL(t, "postgres", "SELECT count(*) FROM facts")
		return err == nil && strings.TrimSpace(out) == "2000"
	})

	// pg_waldump reads WAL straight from the mounted, encrypted volume.
	segs, _ := filepath.Glob(filepath.Join(pa.data, "pg_wal", "0000000*"))
	sort.Strings(segs)
	if len(segs) == 0 {
		t.Fatal("no WAL segments")
	}
	out, err := asPostgres(t, time.Minute, pgBin+"/pg_waldump", "-n", "50", segs[len(segs)-1])
	if err != nil && !strings.Contains(out, "rmgr:") {
		t.Fatalf("pg_waldump: %v\n%s", err, out)
	}
	if !strings.Contains(out, "rmgr:") {
		t.Fatalf("pg_waldump printed no records:\n%s", out)
	}

	// Promote the standby; both sides diverge; pg_rewind the old primary.
	if out, err := asPostgres(t, time.Minute, pgBin+"/pg_ctl", "-D", pb.data, "-w", "promote"); err != nil {
		t.Fatalf("promote: %v\n%s", err, out)
	}
	waitFor(t, 30*time.Second, "promotion", func() bool {
		out, err := pb.trySQL(t, "postgres", "SELECT pg_is_in_recovery()")
		return err == nil && strings.TrimSpace(out) == "f"
	})
	pb.sql(t, "postgres", "INSERT INTO facts VALUES (3001, 'new-primary'); CHECKPOINT;")
	pa.sql(t, "postgres", "INSERT INTO facts VALUES (3002, 'diverged-old-primary')")
	pa.stop(t, "fast")
	if out, err := asPostgres(t, 5*time.Minute, pgBin+"/pg_rewind", "--target-pgdata", pa.data,
		"--source-server", "host="+pb.sock+" port="+strconv.Itoa(pb.port)+" user=postgres dbname=postgres", "-R"); err != nil {
		t.Fatalf("pg_rewind: %v\n%s", err, out)
	}
	pa.start(t, "-c wal_log_hints=on -c wal_keep_size=256MB")
	waitFor(t, 60*time.Second, "rewound old primary follows the new one", func() bool {
		out, err := pa.trySQL(t, "postgres", "SELECT string_agg(v, ',' ORDER BY id) FROM facts WHERE id > 3000")
		return err == nil && strings.TrimSpace(out) == "new-primary"
	})

	// pg_checksums on the stopped, encrypted cluster.
	pa.stop(t, "fast")
	out, err = asPostgres(t, 5*time.Minute, pgBin+"/pg_checksums", "--check", "-D", pa.data)
	if err != nil || !strings.Contains(out, "Bad checksums:  0") {
		t.Fatalf("pg_checksums --check: %v\n%s", err, out)
	}
}

func runOK(t *testing.T, name string, args ...string) {
	t.Helper()
	mustRun(t, time.Minute, name, args...)
}

func waitFor(t *testing.T, d time.Duration, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for: %s", what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
