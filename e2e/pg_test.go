package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// All canaries share this prefix, lowercase so it survives as an
// unquoted SQL identifier too.
const pgCanary = "tdshmcanary"

// TestPostgresCanariesNeverReachTheDisk puts canaries in a table, an
// index, an out-of-line TOAST value, a sequence, a sort spilled to a
// temporary file, a table name (the catalog), a server log line on the
// volume, and a WAL record; all are readable through SQL and the device,
// and none is in the backing file.
func TestPostgresCanariesNeverReachTheDisk(t *testing.T) {
	needPG(t)
	dir := worldDir(t)
	// Volume key only: the encryption floor, whatever the watcher does.
	s := newStackWith(t, &stack{name: "canary", vol: filepath.Join(dir, "canary.vol"), mnt: filepath.Join(dir, "canary.mnt"), runDir: filepath.Join(dir, "run"), noWatch: true})
	p := initPG(t, s.mnt)
	p.sql(t, "postgres", `
CREATE TABLE `+pgCanary+`_named_table (id int PRIMARY KEY, v text, big text);
ALTER TABLE `+pgCanary+`_named_table ALTER big SET STORAGE EXTERNAL;
CREATE INDEX `+pgCanary+`_idx ON `+pgCanary+`_named_table (v);
INSERT INTO `+pgCanary+`_named_table SELECT g, '`+pgCanary+`-row-' || g, CASE WHEN g % 100 = 0 THEN repeat('`+pgCanary+`-toast-', 400) END FROM generate_series(1, 20000) g;
CREATE SEQUENCE `+pgCanary+`_seq;
SELECT nextval('`+pgCanary+`_seq');
SELECT pg_logical_emit_message(true, 'tdeshim', '`+pgCanary+`-wal-message');
DO $$ BEGIN RAISE LOG '`+pgCanary+`-log-line'; END $$;`)
	// A sort far beyond work_mem spills to base/pgsql_tmp on the volume.
	p.sql(t, "postgres", `SET work_mem = '64kB'; SELECT count(*) FROM (SELECT v || md5(v) AS k FROM `+pgCanary+`_named_table ORDER BY 1) s;`)
	p.sql(t, "postgres", "CHECKPOINT")
	// Readable through SQL.
	if got := p.sql(t, "postgres", "SELECT count(*) FROM "+pgCanary+"_named_table WHERE v LIKE '"+pgCanary+"-row-%'"); got != "20000" {
		t.Fatalf("rows: %s", got)
	}
	if got := p.sql(t, "postgres", "SELECT length(big) FROM "+pgCanary+"_named_table WHERE id = 100"); got != strconv.Itoa(400*len(pgCanary+"-toast-")) {
		t.Fatalf("toast value length %s", got)
	}
	logs, _ := filepath.Glob(filepath.Join(p.data, "log", "*"))
	var logText strings.Builder
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		logText.Write(b)
	}
	if !strings.Contains(logText.String(), pgCanary+"-log-line") || !strings.Contains(logText.String(), "temporary file") {
		t.Fatalf("server log on the volume lacks the canary line or the temp-file spill:\n%s", logText.String())
	}
	p.stop(t, "fast")
	s.down(t)

	// On the volume (read back through the whole stack)...
	s.up(t)
	st := s.state(t)
	if n := countInFile(t, st.Device, pgCanary); n == 0 {
		t.Fatal("canaries are not on the device at all; the scan below would prove nothing")
	}
	s.down(t)
	// ...and nowhere in the backing file.
	if n := countInFile(t, s.vol, pgCanary); n != 0 {
		t.Fatalf("PLAINTEXT: %d occurrences of %q in the backing file", n, pgCanary)
	}
	s.up(t)
	// Negative control for the audit of the per-relation tests: without
	// the watcher no relation has a key of its own, and audit says so.
	out, err := run(t, 5*time.Minute, tdeshimBin, "key", "audit", "--volume", s.vol, "--pgdata", p.data)
	if err == nil || !strings.Contains(out, "not under their owner's key") {
		t.Fatalf("audit of a volume-key-only cluster passed:\n%s", out)
	}
	p.start(t)
	if got := p.sql(t, "postgres", "SELECT nextval('"+pgCanary+"_seq')"); got != "2" {
		t.Fatalf("sequence after remount: %s", got)
	}
}

// TestPostgresRewritingDDLAndAmcheck: every DDL that gives a relation a new
// file, then pgbench, then pg_amcheck --heapallindexed.
func TestPostgresRewritingDDLAndAmcheck(t *testing.T) {
	needPG(t)
	need(t, "pgbench")
	dir := worldDir(t)
	s := newStack(t, dir, "ddl")
	p := initPG(t, s.mnt, "-c allow_in_place_tablespaces=on")
	p.pgbench(t, "-i", "-s", "5", "-q", "postgres")
	p.pgbench(t, "-c", "2", "-T", "5", "postgres")
	rewritingDDL(t, p, 5000)
	p.sql(t, "postgres", "CREATE DATABASE second")
	p.sql(t, "second", "CREATE TABLE t AS SELECT generate_series(1, 1000) AS x")
	p.sql(t, "postgres", "DROP DATABASE second")
	if got := p.sql(t, "postgres", "SELECT count(*), sum(id) FROM keep"); got != "5000|12502500" {
		t.Fatalf("keep after rewrites: %s", got)
	}
	if got := p.sql(t, "postgres", "SELECT x FROM gone"); got != "2" {
		t.Fatalf("gone after truncate: %s", got)
	}
	p.amcheck(t)
	// Survives a restart of the whole stack.
	p.stop(t, "fast")
	s.down(t)
	s.up(t)
	p.start(t)
	p.amcheck(t)
	if got := p.sql(t, "postgres", "SELECT count(*) FROM keep"); got != "5000" {
		t.Fatalf("after remount: %s", got)
	}
}

// rewritingDDL runs every DDL that gives a relation a new file (so a new
// key): a table of rows rows is created, indexed, clustered, vacuumed
// full, reindexed and moved to an in-place tablespace (the server needs
// allow_in_place_tablespaces); another is truncated and refilled.
func rewritingDDL(t *testing.T, p *pg, rows int) {
	t.Helper()
	p.sql(t, "postgres", fmt.Sprintf(`
CREATE TABLE keep AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, %d) g;
CREATE INDEX keep_v ON keep (v);
CLUSTER keep USING keep_v;
VACUUM FULL keep;
REINDEX TABLE keep;
CREATE TABLESPACE inplace LOCATION '';
ALTER TABLE keep SET TABLESPACE inplace;
CREATE TABLE gone AS SELECT 1 AS x;
TRUNCATE gone;
INSERT INTO gone VALUES (2);`, rows))
}

// ledger inserts one row per transaction and remembers what committed
// (what psql acknowledged). Every acknowledged id must survive a crash.
type ledger struct {
	mu    sync.Mutex
	acked []int
	stop  chan struct{}
	done  chan struct{}
}

func startLedger(t *testing.T, p *pg) *ledger {
	p.sql(t, "postgres", "CREATE TABLE IF NOT EXISTS ledger (id int PRIMARY KEY, at timestamptz DEFAULT now())")
	l := &ledger{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(l.done)
		base := int(time.Now().UnixNano() % 1000000 * 1000)
		for i := 1; i < 100000; i++ {
			select {
			case <-l.stop:
				return
			default:
			}
			id := base + i
			// One autocommit transaction per psql run: its output (the
			// RETURNING row) exists only once the commit returned.
			out, err := p.trySQL(t, "postgres", fmt.Sprintf("INSERT INTO ledger (id) VALUES (%d) RETURNING id", id))
			if err != nil {
				return
			}
			if strings.TrimSpace(out) == strconv.Itoa(id) {
				l.mu.Lock()
				l.acked = append(l.acked, id)
				l.mu.Unlock()
			}
		}
	}()
	return l
}

func (l *ledger) finish() []int {
	select {
	case <-l.stop:
	default:
		close(l.stop)
	}
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]int(nil), l.acked...)
}

func crashIterations(t *testing.T) int {
	if n, err := strconv.Atoi(os.Getenv("TDESHIM_PG_CRASH_CYCLES")); err == nil && n > 0 {
		return n
	}
	return 2
}

// TestPostgresSurvivesServeKill: kill -9 of serve under pgbench and a
// committing client; restart everything; recovery completes, amcheck is
// clean and every acknowledged commit is there. With powerloss, serve
// models a volatile write cache, so the kill also loses every unflushed
// write, as a power cut would.
func TestPostgresSurvivesServeKill(t *testing.T)      { pgCrash(t, false) }
func TestPostgresSurvivesPowerLossModel(t *testing.T) { pgCrash(t, true) }

func pgCrash(t *testing.T, powerloss bool) {
	needPG(t)
	need(t, "pgbench")
	dir := worldDir(t)
	var serveArgs []string
	if powerloss {
		serveArgs = []string{"--unsafe-volatile-cache-model"}
	}
	s := newStack(t, dir, "crash", serveArgs...)
	p := initPG(t, s.mnt)
	p.pgbench(t, "-i", "-s", "2", "-q", "postgres")
	var all []int
	for cycle := 0; cycle < crashIterations(t); cycle++ {
		l := startLedger(t, p)
		bench := exec.Command("runuser", "-u", "postgres", "--", "pgbench", "-h", p.sock, "-p", strconv.Itoa(p.port), "-U", "postgres", "-c", "2", "-T", "60", "postgres")
		bench.Start()
		time.Sleep(time.Duration(1500+cycle*700) * time.Millisecond)
		s.killServe(t)
		acked := l.finish()
		bench.Process.Kill()
		bench.Wait()
		all = append(all, acked...)
		if len(acked) == 0 {
			t.Fatalf("cycle %d: the ledger committed nothing before the crash", cycle)
		}
		// PostgreSQL is now failing with I/O errors: stop it hard, unmount,
		// detach, bring the stack back, let recovery run.
		p.stopIfRunning(t)
		s.down(t)
		s.up(t)
		p.start(t)
		p.amcheck(t)
		got := p.sql(t, "postgres", "SELECT count(*) FROM ledger WHERE id = ANY('{"+joinInts(all)+"}')")
		if got != strconv.Itoa(len(all)) {
			t.Fatalf("cycle %d: %s of %d acknowledged commits survived", cycle, got, len(all))
		}
		t.Logf("cycle %d: %d acknowledged commits, all present after recovery", cycle, len(acked))
	}
}

func joinInts(xs []int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ",")
}
