package main

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tdeshim/tdeshim/internal/scan"
)

const pgBin = "/usr/lib/postgresql/15/bin"

func demoCommand() *cli.Command {
	return &cli.Command{
		Name:  "demo",
		Usage: "bring up PostgreSQL 15 on an encrypted volume and show ciphertext on disk",
		Description: `As root on a fresh machine, with no flags:
  1. starts a development KMIP server and creates a 2 GiB volume whose
     principal key lives there,
  2. serves it and attaches it as a block device (kernel NBD, or
     nbdfuse + loop where the nbd module is missing),
  3. makes ext4 (nodelalloc,discard), runs initdb and PostgreSQL 15 on it,
  4. writes canary rows and CHECKPOINTs,
  5. shows the rows through psql, and greps the backing file (0 hits)
     beside an unencrypted control volume (hits),
  6. shows that each relation and the WAL have their own data key (serve
     --watch) and audits it: every relation block decrypts under its own
     relation's key.
Then it tears everything down, or with --keep leaves it running and prints
how to connect and how to stop (tdeshim demo --stop).`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Value: "/var/tmp/tdeshim-demo", Usage: "working directory"},
			&cli.BoolFlag{Name: "keep", Usage: "leave PostgreSQL running on the encrypted volume"},
			&cli.BoolFlag{Name: "stop", Usage: "tear down a demo left running with --keep"},
			&cli.IntFlag{Name: "port", Value: 55432, Usage: "PostgreSQL port (unix socket only)"},
		},
		Action: runDemo,
	}
}

// demo holds the pieces to take down, in reverse order.
type demo struct {
	dir      string
	port     int
	undo     []func()
	self     string
	serveCmd *exec.Cmd
}

func (d *demo) step(format string, a ...any) {
	fmt.Printf("\n\033[1m==> "+format+"\033[0m\n", a...)
}

func (d *demo) run(name string, args ...string) (string, error) {
	fmt.Printf("    $ %s\n", shellQuote(append([]string{name}, args...)))
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%s: %v\n%s", name, err, out.String())
	}
	return out.String(), nil
}

func (d *demo) asPostgres(args ...string) (string, error) {
	return d.run("runuser", append([]string{"-u", "postgres", "--"}, args...)...)
}

func (d *demo) teardown() {
	for i := len(d.undo) - 1; i >= 0; i-- {
		d.undo[i]()
	}
	d.undo = nil
}

func runDemo(c *cli.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("demo: run as root (it mounts filesystems and binds loop devices)")
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	d := &demo{dir: c.String("dir"), port: c.Int("port"), self: self}
	if c.Bool("stop") {
		return d.stopKept()
	}
	if err := d.prerequisites(); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(d.dir, "serve.pid")); err == nil {
		return fmt.Errorf("demo: a demo seems to be running in %s; stop it with `tdeshim demo --stop --dir %s`", d.dir, d.dir)
	}
	os.RemoveAll(d.dir)
	if err := os.MkdirAll(d.dir, 0o755); err != nil {
		return err
	}
	err = d.up()
	if err == nil {
		err = d.show()
	}
	if err != nil || !c.Bool("keep") {
		d.step("tearing down")
		d.teardown()
		if err == nil {
			os.RemoveAll(d.dir)
			fmt.Println("\ndone. Run with --keep to leave PostgreSQL running on the encrypted volume.")
		}
		return err
	}
	fmt.Printf(`
The encrypted PostgreSQL keeps running:
    psql -h %s -p %d -U postgres demo
Volume status:
    %s status --volume %s
Stop everything:
    %s demo --stop --dir %s
`, d.dir+"/run", d.port, self, d.dir+"/pg.vol", self, d.dir)
	return nil
}

// startKMS runs `tdeshim kmip-dev-server` as a child in its own session
// (it must outlive the demo with --keep) and waits until it listens.
func (d *demo) startKMS(dir string) (string, error) {
	d.step("start a development KMIP server (mutual TLS, generated certificates; NOT for production)")
	addr := "127.0.0.1:15696"
	if ln, err := net.Listen("tcp", "127.0.0.1:0"); err == nil {
		addr = ln.Addr().String()
		ln.Close()
	}
	fmt.Printf("    $ %s kmip-dev-server --dir %s --listen %s &\n", d.self, dir, addr)
	logf, err := os.Create(filepath.Join(d.dir, "kms.log"))
	if err != nil {
		return "", err
	}
	cmd := exec.Command(d.self, "kmip-dev-server", "--dir", dir, "--listen", addr)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return "", err
	}
	os.WriteFile(filepath.Join(d.dir, "kms.pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644)
	d.undo = append(d.undo, func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		os.Remove(filepath.Join(d.dir, "kms.pid"))
		logf.Close()
	})
	for i := 0; i < 200; i++ {
		if c, err := net.Dial("tcp", addr); err == nil {
			c.Close()
			return addr, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	b, _ := os.ReadFile(logf.Name())
	return "", fmt.Errorf("demo: KMIP dev server did not start:\n%s", b)
}

func (d *demo) prerequisites() error {
	if _, err := os.Stat(filepath.Join(pgBin, "initdb")); err != nil {
		fmt.Println("PostgreSQL 15 is not installed; installing Debian's postgresql package")
		cmd := exec.Command("sh", "-c", "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql")
		cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("demo: install postgresql: %w", err)
		}
	}
	for _, t := range []string{"mkfs.ext4", "losetup", "runuser"} {
		if _, err := exec.LookPath(t); err != nil {
			return fmt.Errorf("demo: %s is missing (make deps installs everything)", t)
		}
	}
	if _, err := user.Lookup("postgres"); err != nil {
		return errors.New("demo: no postgres user (apt-get install postgresql creates it)")
	}
	return nil
}

func (d *demo) up() error {
	vol, sock := filepath.Join(d.dir, "pg.vol"), filepath.Join(d.dir, "pg.sock")
	mnt := filepath.Join(d.dir, "mnt")
	kmsDir := filepath.Join(d.dir, "kms")
	kmsAddr, err := d.startKMS(kmsDir)
	if err != nil {
		return err
	}
	d.step("create an encrypted volume; its principal key lives in the (development) KMIP server")
	if _, err := d.run(d.self, "init", "--volume", vol, "--size", "2G", "--key-provider", "kmip",
		"--kmip-endpoint", kmsAddr, "--kmip-ca", filepath.Join(kmsDir, "ca.pem"),
		"--kmip-cert", filepath.Join(kmsDir, "client.pem"), "--kmip-key", filepath.Join(kmsDir, "client.key"),
		"--principal-key", "demo-principal", "--create-principal-key"); err != nil {
		return err
	}
	d.step("serve it over NBD on a unix socket (mode 0600)")
	ctl := filepath.Join(d.dir, "ctl")
	fmt.Printf("    $ %s serve --volume %s --listen unix:%s --watch %s --control-dir %s &\n", d.self, vol, sock, mnt, ctl)
	logf, err := os.Create(filepath.Join(d.dir, "serve.log"))
	if err != nil {
		return err
	}
	// --watch: serve follows the filesystem once it is mounted there, and
	// gives each relation and the WAL their own data key.
	cmd := exec.Command(d.self, "serve", "--volume", vol, "--listen", "unix:"+sock, "--watch", mnt, "--control-dir", ctl)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	os.WriteFile(filepath.Join(d.dir, "serve.pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644)
	d.serveCmd = cmd
	d.undo = append(d.undo, func() {
		cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
		}
		os.Remove(filepath.Join(d.dir, "serve.pid"))
		logf.Close()
	})
	for i := 0; ; i++ {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if i > 200 {
			b, _ := os.ReadFile(logf.Name())
			return fmt.Errorf("serve did not start:\n%s", b)
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.step("attach it as a block device")
	out, err := d.run(d.self, "attach", "--socket", sock, "--mount-dir", filepath.Join(d.dir, "fuse"))
	if err != nil {
		return err
	}
	dev := strings.TrimSpace(out)
	fmt.Println("    ->", dev)
	d.undo = append(d.undo, func() { d.run(d.self, "detach", dev) })
	d.step("ext4 on it, mounted nodelalloc,discard")
	if _, err := d.run("mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "tdeshim-pg", dev); err != nil {
		return err
	}
	os.MkdirAll(mnt, 0o755)
	if _, err := d.run("mount", "-o", "nodelalloc,discard", dev, mnt); err != nil {
		return err
	}
	d.undo = append(d.undo, func() { d.run("umount", mnt) })
	return d.startPostgres(filepath.Join(mnt, "pgdata"), d.port, "encrypted")
}

// startPostgres runs initdb (with data checksums) and starts PostgreSQL 15
// with its socket in dir/run and its log on the data volume.
func (d *demo) startPostgres(pgdata string, port int, what string) error {
	run := filepath.Join(d.dir, "run")
	os.MkdirAll(run, 0o775)
	for _, p := range []string{filepath.Dir(pgdata), run} {
		d.run("chown", "postgres:postgres", p)
	}
	d.step("initdb and start PostgreSQL 15 (%s)", what)
	if _, err := d.asPostgres(pgBin+"/initdb", "-D", pgdata, "--data-checksums", "-U", "postgres", "--auth=trust"); err != nil {
		return err
	}
	opts := fmt.Sprintf("-p %d -k %s -c listen_addresses='' -c logging_collector=on -c log_directory=log", port, run)
	if _, err := d.asPostgres(pgBin+"/pg_ctl", "-D", pgdata, "-o", opts, "-w", "-l", filepath.Join(pgdata, "startup.log"), "start"); err != nil {
		return err
	}
	d.undo = append(d.undo, func() { d.asPostgres(pgBin+"/pg_ctl", "-D", pgdata, "-m", "fast", "-w", "stop") })
	return nil
}

func (d *demo) psql(port int, db, sql string) (string, error) {
	return d.asPostgres("psql", "-X", "-h", filepath.Join(d.dir, "run"), "-p", strconv.Itoa(port), "-U", "postgres", "-d", db, "-v", "ON_ERROR_STOP=1", "-c", sql)
}

const demoCanary = "TDESHIM-DEMO-CANARY"

func (d *demo) canaryRows(port int) error {
	if _, err := d.psql(port, "postgres", "CREATE DATABASE demo"); err != nil {
		return err
	}
	sql := `CREATE TABLE patients (id int PRIMARY KEY, name text, card text);
INSERT INTO patients SELECT g, '` + demoCanary + `-name-' || g, '` + demoCanary + `-card-4111-' || g FROM generate_series(1, 1000) g;
CHECKPOINT;`
	_, err := d.psql(port, "demo", sql)
	return err
}

func (d *demo) show() error {
	d.step("write 1000 canary rows and CHECKPOINT")
	if err := d.canaryRows(d.port); err != nil {
		return err
	}
	out, err := d.psql(d.port, "demo", "SELECT id, name, card FROM patients ORDER BY id LIMIT 3")
	if err != nil {
		return err
	}
	fmt.Print(indent(out))

	d.step("an unencrypted control volume: plain file, loop device, ext4, PostgreSQL")
	plain := filepath.Join(d.dir, "control.img")
	if _, err := d.run("truncate", "-s", "1G", plain); err != nil {
		return err
	}
	out, err = d.run("losetup", "--find", "--show", plain)
	if err != nil {
		return err
	}
	loop := strings.TrimSpace(out)
	d.undo = append(d.undo, func() { d.run("losetup", "-d", loop) })
	cmnt := filepath.Join(d.dir, "control-mnt")
	os.MkdirAll(cmnt, 0o755)
	if _, err := d.run("mkfs.ext4", "-q", "-F", "-b", "4096", loop); err != nil {
		return err
	}
	if _, err := d.run("mount", loop, cmnt); err != nil {
		return err
	}
	d.undo = append(d.undo, func() { d.run("umount", cmnt) })
	if err := d.startPostgres(filepath.Join(cmnt, "pgdata"), d.port+1, "unencrypted control"); err != nil {
		return err
	}
	if err := d.canaryRows(d.port + 1); err != nil {
		return err
	}
	d.run("sync")

	d.step("look for the canary in what is on disk")
	enc := countIn(filepath.Join(d.dir, "pg.vol"), demoCanary)
	ctl := countIn(plain, demoCanary)
	fmt.Printf("\n    %-52s %s\n", "backing store", "occurrences of "+demoCanary)
	fmt.Printf("    %-52s %d\n", "tdeshim volume "+filepath.Join(d.dir, "pg.vol"), enc)
	fmt.Printf("    %-52s %d\n", "control (unencrypted) "+plain, ctl)
	if enc != 0 {
		return fmt.Errorf("demo: PLAINTEXT FOUND in the encrypted backing file (%d occurrences); this is a bug", enc)
	}
	if ctl == 0 {
		return errors.New("demo: the control volume shows no canary; the comparison proves nothing (was the data flushed?)")
	}
	fmt.Println("\n    The rows are readable through PostgreSQL and absent from the encrypted disk.")
	d.step("per-relation keys: every table, index and the WAL has its own data key")
	vol, ctlDir := filepath.Join(d.dir, "pg.vol"), filepath.Join(d.dir, "ctl")
	relnode, err := d.asPostgres("psql", "-X", "-At", "-h", filepath.Join(d.dir, "run"), "-p", strconv.Itoa(d.port), "-U", "postgres", "-d", "demo", "-c", "SELECT pg_relation_filenode('patients')")
	if err != nil {
		return err
	}
	relnode = strings.TrimSpace(relnode)
	d.settle(vol, ctlDir)
	out, err = d.run(d.self, "status", "--volume", vol, "--control-dir", ctlDir, "--relations")
	if err != nil {
		return err
	}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		keep := len(f) > 1 && f[1] == relnode || strings.HasPrefix(l, "relation keys") || strings.HasPrefix(l, "  DATABASE") ||
			strings.HasPrefix(l, "WAL key") || strings.HasPrefix(l, "volume key") || strings.HasPrefix(l, "key slots") ||
			strings.HasPrefix(l, "watch") || strings.HasPrefix(l, "rekeyer") || strings.HasPrefix(l, "memory")
		if keep {
			fmt.Println("    " + l)
		}
	}
	fmt.Printf("    (the patients table is relfilenode %s; the full list has one line per relation)\n", relnode)
	d.step("audit: decrypt every relation block with its own relation's key only, compare with the files")
	d.run("sync")
	out, err = d.run(d.self, "key", "audit", "--volume", vol, "--pgdata", filepath.Join(d.dir, "mnt", "pgdata"))
	fmt.Print(indent(out))
	return err
}

// settle waits (up to a minute) for the rekeyer to have nothing pending.
func (d *demo) settle(vol, ctl string) {
	for i := 0; i < 120; i++ {
		out, err := exec.Command(d.self, "status", "--volume", vol, "--control-dir", ctl, "--json").Output()
		if err == nil && bytes.Contains(out, []byte(`"pending_blocks": 0,`)) && !bytes.Contains(out, []byte(`"retiring_slots": 1`)) {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// shellQuote renders a command line the way a reader would type it.
func shellQuote(args []string) string {
	out := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\n'\"$;|&<>*?()") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		out[i] = a
	}
	return strings.Join(out, " ")
}

// countIn counts occurrences of s in the file at path (-1 if unreadable).
func countIn(path, s string) int {
	n, err := scan.Count(path, []byte(s))
	if err != nil {
		return -1
	}
	return n
}

func indent(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString("    " + l + "\n")
	}
	return b.String()
}

// stopKept tears down a demo left running with --keep.
func (d *demo) stopKept() error {
	mnt, cmnt := filepath.Join(d.dir, "mnt"), filepath.Join(d.dir, "control-mnt")
	for _, pg := range []string{filepath.Join(mnt, "pgdata"), filepath.Join(cmnt, "pgdata")} {
		if _, err := os.Stat(filepath.Join(pg, "postmaster.pid")); err == nil {
			d.asPostgres(pgBin+"/pg_ctl", "-D", pg, "-m", "fast", "-w", "stop")
		}
	}
	for _, m := range []string{mnt, cmnt} {
		if isMountPoint(m) {
			d.run("umount", m)
		}
	}
	if out, err := exec.Command("losetup", "-j", filepath.Join(d.dir, "control.img")).Output(); err == nil {
		if dev, _, ok := strings.Cut(string(out), ":"); ok {
			d.run("losetup", "-d", dev)
		}
	}
	if out, err := exec.Command("losetup", "-j", filepath.Join(d.dir, "fuse", "nbd")).Output(); err == nil {
		if dev, _, ok := strings.Cut(string(out), ":"); ok {
			d.run(d.self, "detach", dev)
		}
	}
	for _, pf := range []string{"serve.pid", "kms.pid"} {
		if b, err := os.ReadFile(filepath.Join(d.dir, pf)); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && isTdeshimProcess(pid) {
				syscall.Kill(pid, syscall.SIGTERM)
				for i := 0; i < 300 && syscall.Kill(pid, 0) == nil; i++ {
					time.Sleep(100 * time.Millisecond)
				}
			}
		}
	}
	os.RemoveAll(d.dir)
	fmt.Println("demo stopped and removed")
	return nil
}
