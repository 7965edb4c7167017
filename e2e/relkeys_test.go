package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/store"
	"github.com/tdeshim/tdeshim/volume"
)

// liveStatus is the part of `status --relations --json` these tests read.
type liveStatus struct {
	Relations []map[string]any `json:"relations"`
	Keys      struct {
		Watched   bool `json:"watched"`
		Destroyed int  `json:"destroyed_keys"`
		WAL       *struct {
			KeySlot      int   `json:"key_slot"`
			BlocksOwnKey int64 `json:"blocks_own_key"`
		} `json:"wal"`
		Retiring []struct {
			KeySlot int `json:"key_slot"`
		} `json:"retiring"`
	} `json:"keys"`
	Live struct {
		Rekey volume.RekeyStats `json:"rekey"`
		Watch struct {
			Problem string `json:"problem"`
			Files   int    `json:"files"`
			Scans   int    `json:"scans"`
		} `json:"watch"`
	} `json:"live"`
}

func (s *stack) status(t *testing.T) liveStatus {
	t.Helper()
	out := mustRun(t, time.Minute, "env", "TDESHIM_CONTROL_DIR="+s.runDir, tdeshimBin, "status", "--volume", s.vol, "--relations", "--json")
	var st liveStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("status --relations --json: %v\n%.2000s", err, out)
	}
	return st
}

// settle waits until the watcher has indexed the tree, the rekeyer has
// nothing pending, no key is retiring and no indexed block of a relation
// is under another key — twice, a sweep apart.
func (s *stack) settle(t *testing.T) liveStatus {
	t.Helper()
	exec.Command("sync").Run()
	deadline := time.Now().Add(3 * time.Minute)
	settled := func(st liveStatus) bool {
		if st.Live.Watch.Scans == 0 || st.Live.Rekey.PendingBlocks != 0 || len(st.Keys.Retiring) != 0 {
			return false
		}
		for _, r := range st.Relations {
			if n, _ := r["blocks_other_key"].(float64); n != 0 {
				return false
			}
		}
		return true
	}
	for {
		st := s.status(t)
		if st.Live.Watch.Problem != "" {
			t.Fatalf("watcher is not indexing: %s", st.Live.Watch.Problem)
		}
		if settled(st) {
			time.Sleep(1500 * time.Millisecond)
			if st2 := s.status(t); settled(st2) {
				return st2
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("rekeyer did not settle: %+v, %d keys retiring, %d scans", st.Live.Rekey, len(st.Keys.Retiring), st.Live.Watch.Scans)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

type auditCounts struct {
	OwnKey   int64 `json:"own_key"`
	Mismatch int64 `json:"mismatch"`
	Zero     int64 `json:"zero"`
	NoKey    int64 `json:"no_key"`
}

type auditResult struct {
	RelationFiles  int              `json:"relation_files"`
	RelationBlocks auditCounts      `json:"relation_blocks"`
	WALBlocks      auditCounts      `json:"wal_blocks"`
	Problems       []map[string]any `json:"problems"`
}

// audit runs the independent checker; every non-zero block of every
// relation file and WAL segment must decrypt under its owner's key alone.
func (s *stack) audit(t *testing.T, pgdata string) auditResult {
	t.Helper()
	out, err := run(t, 10*time.Minute, tdeshimBin, "key", "audit", "--volume", s.vol, "--pgdata", pgdata, "--json")
	var r auditResult
	if jerr := json.Unmarshal([]byte(out[:strings.LastIndex(out, "}")+1]), &r); jerr != nil {
		t.Fatalf("key audit: %v %v\n%.3000s", err, jerr, out)
	}
	if err != nil || r.RelationBlocks.Mismatch+r.RelationBlocks.NoKey+r.WALBlocks.Mismatch+r.WALBlocks.NoKey != 0 {
		b, _ := os.ReadFile(s.state(t).Log)
		t.Fatalf("key audit: %v\n%.3000s\nserve log tail:\n%s", err, out, tail(string(b), 3000))
	}
	return r
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// TestPerRelationKeysAfterPgbenchAndDDL: pgbench and every DDL that gives
// a relation a new file, in two databases and a tablespace; settle; then
// the independent audit finds 100% of relation blocks under their own
// relation's key and WAL blocks under the WAL key, and status --relations
// --json keeps its contract.
func TestPerRelationKeysAfterPgbenchAndDDL(t *testing.T) {
	needPG(t)
	need(t, "pgbench")
	dir := worldDir(t)
	port := int(nextPort.Add(1))
	dsn := fmt.Sprintf("host=%s port=%d user=postgres dbname=postgres", filepath.Join(dir, "relkeys.mnt", "sock"), port)
	s := newStack(t, dir, "relkeys", "--rekey-rate=0", "--shred-grace=2s", "--dsn="+dsn)
	p := initPGOn(t, s.mnt, port, "-c allow_in_place_tablespaces=on")
	p.pgbench(t, "-i", "-s", "5", "-q", "postgres")
	p.pgbench(t, "-c", "2", "-T", "10", "postgres")
	rewritingDDL(t, p, 20000)
	p.sql(t, "postgres", `
DROP TABLE pgbench_history;
CREATE MATERIALIZED VIEW mv AS SELECT id % 100 AS k, count(*) FROM keep GROUP BY 1;`)
	p.sql(t, "postgres", "CREATE DATABASE second")
	p.sql(t, "second", "CREATE TABLE t AS SELECT generate_series(1, 50000) AS x, md5(random()::text) AS y")
	p.amcheck(t)
	accounts := p.sql(t, "postgres", "SELECT pg_relation_filenode('pgbench_accounts')")
	dbOID := p.sql(t, "postgres", "SELECT oid FROM pg_database WHERE datname = 'postgres'")
	p.sql(t, "postgres", "CHECKPOINT")
	// --dsn: names come from the catalog (loaded in the background).
	wantName := "postgres.public.pgbench_accounts"
	waitFor(t, time.Minute, "status to name pgbench_accounts", func() bool {
		for _, rel := range s.status(t).Relations {
			if rel["name"] == wantName {
				return true
			}
		}
		return false
	})
	p.stop(t, "fast")
	st := s.settle(t)
	r := s.audit(t, p.data)
	t.Logf("audit: %d relation files, %d blocks under their own key (%d all-zero); WAL %d blocks under the WAL key",
		r.RelationFiles, r.RelationBlocks.OwnKey, r.RelationBlocks.Zero, r.WALBlocks.OwnKey)
	if r.RelationBlocks.OwnKey < 5000 || r.WALBlocks.OwnKey == 0 || r.RelationFiles < 500 {
		t.Fatalf("audit checked too little to mean anything: %+v", r)
	}
	// The scripts' contract.
	if !st.Keys.Watched || len(st.Relations) < 500 {
		t.Fatalf("status --relations: watched=%v, %d relations", st.Keys.Watched, len(st.Relations))
	}
	found := false
	for _, rel := range st.Relations {
		for _, k := range []string{"tablespace_oid", "database_oid", "relfilenode", "key_slot", "blocks_own_key", "blocks_other_key"} {
			if _, ok := rel[k].(float64); !ok {
				t.Fatalf("relation entry lacks number %q: %v", k, rel)
			}
		}
		if n, ok := rel["name"]; !ok || (n != nil && fmt.Sprint(n) == "") {
			t.Fatalf("relation entry lacks name (string or null): %v", rel)
		}
		if fmt.Sprint(rel["relfilenode"]) == accounts && fmt.Sprint(rel["database_oid"]) == dbOID {
			found = true
			if rel["name"] != wantName {
				t.Fatalf("pgbench_accounts is named %v", rel["name"])
			}
			if rel["blocks_own_key"].(float64) < 1000 || rel["blocks_other_key"].(float64) != 0 {
				t.Fatalf("pgbench_accounts: %v", rel)
			}
		}
	}
	if !found {
		t.Fatalf("pgbench_accounts (%s/%s) is not in status --relations", dbOID, accounts)
	}
	if st.Keys.WAL == nil || st.Keys.WAL.BlocksOwnKey == 0 {
		t.Fatalf("no WAL key share in status: %+v", st.Keys.WAL)
	}
	if st.Live.Rekey.Amplification > 0.5 {
		t.Errorf("rekey amplification %.2f: the watcher misses most new files", st.Live.Rekey.Amplification)
	}
	t.Logf("rekeyer: %+v", st.Live.Rekey)
}

// TestCryptoShredOfADroppedTable: a canary table's key is destroyed after
// its files are gone for the grace period. A copy of the backing store
// taken before the drop, decrypted with every key the volume still has,
// shows no canary; the same copy's own (still wrapped) key does — the
// documented limit: a snapshot carries its key table, so shredding covers
// old copies once their principal key is gone too.
func TestCryptoShredOfADroppedTable(t *testing.T) {
	needPG(t)
	dir := worldDir(t)
	// With --dsn the catalog must also agree the table is gone.
	port := int(nextPort.Add(1))
	dsn := fmt.Sprintf("host=%s port=%d user=postgres dbname=postgres", filepath.Join(dir, "shred.mnt", "sock"), port)
	s := newStack(t, dir, "shred", "--shred-grace=2s", "--dsn="+dsn)
	p := initPGOn(t, s.mnt, port)
	const canary = "SHREDCANARY-2f9a"
	p.sql(t, "postgres", "CREATE TABLE shredme AS SELECT g AS id, '"+canary+"-' || g AS v FROM generate_series(1, 30000) g")
	rel := p.sql(t, "postgres", "SELECT pg_relation_filenode('shredme')")
	db := p.sql(t, "postgres", "SELECT oid FROM pg_database WHERE datname = current_database()")
	p.sql(t, "postgres", "CHECKPOINT")
	s.settle(t)
	relN, _ := strconv.Atoi(rel)
	dbN, _ := strconv.Atoi(db)
	key := layout.RelKey{Tablespace: layout.DefaultTablespace, Database: uint32(dbN), RelNode: uint32(relN)}
	slot := slotOf(t, s.vol, key)
	if slot == 0 {
		t.Fatalf("relation %v has no key before the drop", key)
	}
	before := dir + "/before.vol"
	mustRun(t, 5*time.Minute, "cp", "--sparse=always", s.vol, before)
	p.sql(t, "postgres", "DROP TABLE shredme")
	// PostgreSQL unlinks the emptied first segment at the next checkpoint.
	p.sql(t, "postgres", "CHECKPOINT")
	p.sql(t, "postgres", "CHECKPOINT")
	waitFor(t, 2*time.Minute, "the dropped table's key to be destroyed", func() bool {
		return slotState(t, s.vol, slot) == layout.SlotDestroyed
	})
	// Decrypt the old copy's canary blocks with every key the volume has.
	oldV := openRO(t, before)
	liveV := openRO(t, s.vol)
	var canaryBlocks []uint64
	oldState, err := volume.Inspect(mustNoLock(t, before))
	if err != nil {
		t.Fatal(err)
	}
	for b, e := range oldState.Entries {
		if e == slot {
			canaryBlocks = append(canaryBlocks, uint64(b))
		}
	}
	if len(canaryBlocks) < 50 {
		t.Fatalf("only %d blocks under the canary key in the copy", len(canaryBlocks))
	}
	ct := make([]byte, layout.BlockSize)
	pt := make([]byte, layout.BlockSize)
	// Positive control: the copy's own key finds the canary.
	hits := 0
	for _, b := range canaryBlocks {
		oldV.ReadCiphertext(ct, b)
		oldV.DecryptBlock(slot, pt, ct, b)
		if bytes.Contains(pt, []byte(canary)) {
			hits++
		}
	}
	if hits == 0 {
		t.Fatal("the copy's own key does not find the canary: the negative check below would prove nothing")
	}
	live := liveV.Slots()
	tried := 0
	for i := range live {
		if !live[i].HasKey() {
			continue
		}
		tried++
		for _, b := range canaryBlocks {
			oldV.ReadCiphertext(ct, b)
			if err := liveV.DecryptBlock(uint32(i), pt, ct, b); err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(pt, []byte(canary)) {
				t.Fatalf("the canary decrypts from the old copy with live key slot %d", i)
			}
		}
	}
	if sl := live[slot]; sl.State != layout.SlotDestroyed || sl.Ciphertext != ([layout.WrappedKeySize]byte{}) {
		t.Fatalf("slot %d after shredding: state %d, wrapped key not wiped", slot, sl.State)
	}
	t.Logf("shredded slot %d: %d canary blocks in the old copy; its own key finds the canary in %d, none of the %d live keys does", slot, len(canaryBlocks), hits, tried)
	p.amcheck(t)
}

// TestOnlineRotationDuringPgbench: key rotate --all while pgbench and a
// committing ledger run: no client error, every acknowledged commit
// present, amcheck clean, every old key destroyed, audit clean after.
func TestOnlineRotationDuringPgbench(t *testing.T) {
	needPG(t)
	need(t, "pgbench")
	dir := worldDir(t)
	s := newStack(t, dir, "rotate", "--rekey-rate=64MiB")
	p := initPG(t, s.mnt)
	p.pgbench(t, "-i", "-s", "5", "-q", "postgres")
	s.settle(t)
	before := s.status(t)
	l := startLedger(t, p)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bench := exec.CommandContext(ctx, "runuser", "-u", "postgres", "--", "pgbench", "-h", p.sock, "-p", strconv.Itoa(p.port), "-U", "postgres", "-c", "2", "-T", "25", "postgres")
	var benchOut bytes.Buffer
	bench.Stdout, bench.Stderr = &benchOut, &benchOut
	if err := bench.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	out := mustRun(t, 5*time.Minute, "env", "TDESHIM_CONTROL_DIR="+s.runDir, tdeshimBin, "key", "rotate", "--volume", s.vol, "--all")
	t.Logf("rotate: %s", tail(out, 300))
	if err := bench.Wait(); err != nil {
		t.Fatalf("pgbench during rotation: %v\n%s", err, benchOut.String())
	}
	acked := l.finish()
	if len(acked) == 0 {
		t.Fatal("the ledger committed nothing")
	}
	if got := p.sql(t, "postgres", "SELECT count(*) FROM ledger WHERE id = ANY('{"+joinInts(acked)+"}')"); got != strconv.Itoa(len(acked)) {
		t.Fatalf("%s of %d acknowledged commits present", got, len(acked))
	}
	p.amcheck(t)
	p.sql(t, "postgres", "CHECKPOINT")
	p.stop(t, "fast")
	after := s.settle(t)
	if after.Keys.Destroyed < len(before.Relations) {
		t.Fatalf("%d keys destroyed after rotating %d relation keys", after.Keys.Destroyed, len(before.Relations))
	}
	r := s.audit(t, p.data)
	t.Logf("rotated %d relation keys + WAL + volume during pgbench (%s); %d ledger commits; audit: %d blocks under own key; rekeyer %+v",
		len(before.Relations), strings.TrimSpace(lastLine(benchOut.String(), "tps")), len(acked), r.RelationBlocks.OwnKey, after.Live.Rekey)
}

func lastLine(s, substr string) string {
	ls := strings.Split(s, "\n")
	for i := len(ls) - 1; i >= 0; i-- {
		if strings.Contains(ls[i], substr) {
			return ls[i]
		}
	}
	return ""
}

func mustNoLock(t *testing.T, path string) *store.File {
	t.Helper()
	f, err := store.OpenFileNoLock(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// openRO opens a volume read-only, without its lock, keys from its KMS.
func openRO(t *testing.T, path string) *volume.Volume {
	t.Helper()
	v, err := volume.Open(context.Background(), mustNoLock(t, path), volume.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	return v
}

func slotOf(t *testing.T, path string, k layout.RelKey) uint32 {
	st, err := volume.Inspect(mustNoLock(t, path))
	if err != nil {
		t.Fatal(err)
	}
	for i, sl := range st.Slots {
		if sl.State == layout.SlotActive && sl.Kind == layout.KindRelation && sl.Rel() == k {
			return uint32(i)
		}
	}
	return 0
}

func slotState(t *testing.T, path string, slot uint32) uint8 {
	st, err := volume.Inspect(mustNoLock(t, path))
	if err != nil {
		t.Fatal(err)
	}
	return st.Slots[slot].State
}
