// Package containers is the testcontainers-go variant of the PostgreSQL
// end-to-end test: PostgreSQL 15 and PyKMIP run in containers, on a data
// directory that lives on a tdeshim volume attached on the host. It is its
// own Go module, so testcontainers and the Docker client never enter the
// tdeshim binary's dependency graph.
//
// It needs a reachable Docker engine and skips, saying so, where there is
// none (as on the machines this project is developed and tested on).
package containers

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"
)

// dockerReachable asks the Docker engine for its version.
// testcontainers-go panics when it finds no Docker host; that is a
// "not reachable" here.
func dockerReachable(ctx context.Context) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%v", r)
		}
	}()
	p, err := testcontainers.NewDockerProvider()
	if err != nil {
		return err
	}
	defer p.Close()
	return p.Health(ctx)
}

func TestPostgresContainerOnTdeshimVolume(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	if err := dockerReachable(ctx); err != nil {
		t.Skipf("no Docker engine reachable (%v): the testcontainers variant did not run; the same checks run against host PostgreSQL in e2e/", err)
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to attach and mount the tdeshim volume")
	}
	bin := os.Getenv("TDESHIM_BIN")
	if bin == "" {
		t.Skip("set TDESHIM_BIN to a built tdeshim binary")
	}
	dir := t.TempDir()
	vol, mnt, run := filepath.Join(dir, "pg.vol"), filepath.Join(dir, "mnt"), filepath.Join(dir, "run")
	must := func(name string, args ...string) {
		t.Helper()
		if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
	}
	must(bin, "init", "--volume", vol, "--size", "2G", "--key-file", filepath.Join(dir, "k"))
	must(bin, "up", "--volume", vol, "--mount", mnt, "--name", "ctr", "--run-dir", run)
	t.Cleanup(func() { exec.Command(bin, "down", "--name", "ctr", "--run-dir", run).Run() })
	// The official image runs as uid 999 (postgres).
	must("chown", "999:999", mnt)

	pgc, err := testcontainers.GenericContainer(ctx, testcontainers.GenericContainerRequest{
		ContainerRequest: testcontainers.ContainerRequest{
			Image:        "postgres:15",
			Env:          map[string]string{"POSTGRES_PASSWORD": "test", "PGDATA": "/data/pgdata"},
			Mounts:       testcontainers.Mounts(testcontainers.BindMount(mnt, "/data")),
			ExposedPorts: []string{"5432/tcp"},
			WaitingFor:   wait.ForLog("database system is ready to accept connections").WithOccurrence(2).WithStartupTimeout(3 * time.Minute),
		},
		Started: true,
	})
	if err != nil {
		t.Fatalf("start postgres container: %v", err)
	}
	t.Cleanup(func() { pgc.Terminate(context.Background()) })
	const canary = "tdshmctrcanary"
	code, out, err := pgc.Exec(ctx, []string{"psql", "-U", "postgres", "-c",
		fmt.Sprintf("CREATE TABLE t AS SELECT '%s-' || g AS v FROM generate_series(1, 1000) g; CHECKPOINT;", canary)})
	if err != nil || code != 0 {
		t.Fatalf("psql in container: %d %v %v", code, err, out)
	}
	pgc.Stop(ctx, nil)
	must("sync")
	b, err := os.ReadFile(vol)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), canary) {
		t.Fatal("canary found in the backing file")
	}
}
