package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ovh/kmip-go"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/volume"
	"github.com/tdeshim/tdeshim/walwatch"
)

// TestDatabasePrincipalRevocation: database tenant_a gets its own
// principal key in the KMS (PyKMIP). Revoking that key under a running
// serve wipes tenant_a's data keys — its blocks fail I/O — while
// tenant_b's blocks read; after a restart of the whole stack the volume
// opens without the revoked key, tenant_b answers queries and tenant_a
// cannot be read. The database is closed to writes before the revocation,
// as docs/OPERATIONS.md says: PostgreSQL cannot write back pages of a
// database whose key is gone, and a failed write-back is a PANIC.
func TestDatabasePrincipalRevocation(t *testing.T) {
	needPG(t)
	need(t, "dd")
	dir := worldDir(t)
	s := newStack(t, dir, "tenant", "--kms-check-interval=500ms")
	p := initPG(t, s.mnt)
	p.sql(t, "postgres", "CREATE DATABASE tenant_a")
	p.sql(t, "postgres", "CREATE DATABASE tenant_b")
	for _, db := range []string{"tenant_a", "tenant_b"} {
		p.sql(t, db, "CREATE TABLE t AS SELECT g AS id, md5(g::text) AS v FROM generate_series(1, 20000) g")
	}
	p.sql(t, "postgres", "CHECKPOINT")
	aOID := p.sql(t, "postgres", "SELECT oid FROM pg_database WHERE datname = 'tenant_a'")
	bOID := p.sql(t, "postgres", "SELECT oid FROM pg_database WHERE datname = 'tenant_b'")
	aRel := p.sql(t, "tenant_a", "SELECT pg_relation_filenode('t')")
	bRel := p.sql(t, "tenant_b", "SELECT pg_relation_filenode('t')")
	s.settle(t)

	name := fmt.Sprintf("tenant-a-%d", time.Now().UnixNano())
	out := mustRun(t, 5*time.Minute, "env", "TDESHIM_CONTROL_DIR="+s.runDir, tdeshimBin, "key", "set-principal", "--volume", s.vol,
		"--database", aOID, "--principal-key", name, "--create-principal-key")
	t.Logf("set-principal: %s", strings.TrimSpace(out))
	st, err := volume.Inspect(mustNoLock(t, s.vol))
	if err != nil {
		t.Fatal(err)
	}
	pt, _ := keys.ParsePrincipals(st.Header.ProviderConfig)
	var aOIDn uint32
	fmt.Sscan(aOID, &aOIDn)
	entry, ok := pt.Databases[aOIDn]
	if !ok {
		t.Fatalf("header lists no principal for database %s: %+v", aOID, pt.Databases)
	}
	nA := 0
	for _, sl := range st.Slots {
		if sl.HasKey() && sl.Kind == layout.KindRelation {
			if sl.Database == aOIDn && sl.Principal != entry {
				t.Fatalf("a tenant_a key is still wrapped by principal %d", sl.Principal)
			}
			if sl.Database != aOIDn && sl.Principal == entry {
				t.Fatalf("a key of database %d is wrapped by tenant_a's principal", sl.Database)
			}
			if sl.Database == aOIDn {
				nA++
			}
		}
	}
	if nA < 100 {
		t.Fatalf("only %d tenant_a keys", nA)
	}

	// The documented procedure before revoking a tenant's key: no more
	// writes to that database (PostgreSQL PANICs when a write-back of a
	// page it holds dirty fails), so vacuum it, close it, checkpoint.
	p.sql(t, "tenant_a", "VACUUM ANALYZE")
	p.sql(t, "postgres", "ALTER DATABASE tenant_a ALLOW_CONNECTIONS false")
	p.sql(t, "postgres", "CHECKPOINT")
	// Revoke tenant_a's key in the KMS.
	k := sharedPyKMS(t)
	prov, err := keys.OpenKMIP(context.Background(), k.settings(name), false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := prov.Client().Revoke(prov.Settings().KeyID).WithRevocationReasonCode(kmip.RevocationReasonCodeKeyCompromise).ExecContext(context.Background()); err != nil {
		t.Fatalf("revoke: %v", err)
	}
	prov.Close()
	waitFor(t, 30*time.Second, "serve to suspend tenant_a's principal", func() bool {
		b, _ := os.ReadFile(s.state(t).Log)
		return strings.Contains(string(b), "principal key of a database revoked")
	})
	// Block level, under the page cache: tenant_a's table fails, tenant_b's reads.
	dev := s.state(t).Device
	blockOf := func(db, rel string) uint64 {
		ext, err := walwatch.Extents(filepath.Join(p.data, "base", db, rel))
		if err != nil || len(ext) == 0 {
			t.Fatalf("FIEMAP base/%s/%s: %v %v", db, rel, ext, err)
		}
		return ext[0].Start
	}
	readDirect := func(blk uint64) error {
		_, err := run(t, time.Minute, "dd", "if="+dev, "of=/dev/null", "bs=4096", "count=1", fmt.Sprintf("skip=%d", blk), "iflag=direct")
		return err
	}
	if err := readDirect(blockOf(bOID, bRel)); err != nil {
		t.Fatalf("tenant_b's block fails after tenant_a's key was revoked: %v", err)
	}
	if err := readDirect(blockOf(aOID, aRel)); err == nil {
		blk := blockOf(aOID, aRel)
		st, _ := volume.Inspect(mustNoLock(t, s.vol))
		e := st.Entries[blk]
		for _, rel := range s.status(t).Relations {
			if fmt.Sprint(rel["relfilenode"]) == aRel {
				t.Logf("status: %v", rel)
			}
		}
		b, _ := os.ReadFile(s.state(t).Log)
		t.Fatalf("tenant_a's block %d still reads after its principal key was revoked: durable entry %d (slot %+v)\nserve log:\n%s", blk, e, st.Slots[e], tail(string(b), 4000))
	}
	if out := mustRun(t, time.Minute, "env", "TDESHIM_CONTROL_DIR="+s.runDir, tdeshimBin, "status", "--volume", s.vol); !strings.Contains(out, "REVOKED") {
		t.Fatalf("status does not show the revoked database key:\n%s", out)
	}

	// Restart everything: the volume opens without tenant_a's key.
	p.stop(t, "fast")
	s.down(t)
	s.up(t)
	p.start(t)
	if got := p.sql(t, "tenant_b", "SELECT count(*) FROM t"); got != "20000" {
		t.Fatalf("tenant_b after restart: %s", got)
	}
	if got := p.sql(t, "postgres", "SELECT count(*) FROM pg_class"); got == "" {
		t.Fatal("postgres database unreadable")
	}
	p.sql(t, "postgres", "ALTER DATABASE tenant_a ALLOW_CONNECTIONS true")
	if out, err := p.trySQL(t, "tenant_a", "SELECT count(*) FROM t"); err == nil {
		t.Fatalf("tenant_a answered after its key was revoked: %s", out)
	} else {
		t.Logf("tenant_a, as it should: %s", strings.TrimSpace(tail(out, 200)))
	}
}
