package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/tdeshim/tdeshim/attach"
	"github.com/tdeshim/tdeshim/store"
)

// upState is what `up` started, so `down` can undo it in order.
type upState struct {
	Name    string `json:"name"`
	Volume  string `json:"volume"`
	Socket  string `json:"socket"`
	Device  string `json:"device"`
	Mount   string `json:"mount"`
	PID     int    `json:"serve_pid"`
	Log     string `json:"serve_log"`
	Control string `json:"control_dir"`
}

func statePath(runDir, name string) string { return filepath.Join(runDir, name+".up.json") }

func upCommand() *cli.Command {
	return &cli.Command{
		Name:      "up",
		Usage:     "serve a volume, attach it, make ext4 on first use and mount it for PostgreSQL",
		ArgsUsage: " ",
		Description: `One command for the whole chain:
   tdeshim serve (in the background, its own session)
   → tdeshim attach (kernel NBD, or nbdfuse + loop)
   → mkfs.ext4 -b 4096 (only if the device holds no ext4 yet)
   → mount -o nodelalloc,discard
serve watches the mount (--watch) so each relation and the WAL get their own
data keys; --no-watch keeps everything under the volume key.
Refuses a volume another serve holds and a directory that is already a
mount point. Undo with: tdeshim down --name NAME (or --mount DIR).`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "volume", Required: true, Usage: "backing file or device", EnvVars: []string{"TDESHIM_VOLUME"}},
			&cli.StringFlag{Name: "mount", Required: true, Usage: "where to mount the filesystem (e.g. /var/lib/postgresql/15/main)", EnvVars: []string{"TDESHIM_MOUNT"}},
			&cli.StringFlag{Name: "name", Usage: "name of this stack (default: the volume file name)"},
			&cli.StringFlag{Name: "run-dir", Value: defaultRunDir(), Usage: "sockets, state and logs"},
			&cli.StringFlag{Name: "via", Value: "auto", Usage: "attach route: kernel, fuse-loop or auto"},
			&cli.StringFlag{Name: "owner", Usage: "chown the mounted filesystem's root to this user (e.g. postgres)"},
			&cli.StringSliceFlag{Name: "serve-arg", Usage: "extra argument for serve (repeatable), e.g. --serve-arg=--shred-grace=1h"},
			&cli.BoolFlag{Name: "no-watch", Usage: "volume key only: do not give serve --watch (no per-relation or WAL keys)"},
		},
		Action: runUp,
	}
}

func defaultRunDir() string {
	if d := os.Getenv("TDESHIM_RUN_DIR"); d != "" {
		return d
	}
	return "/run/tdeshim"
}

func downCommand() *cli.Command {
	return &cli.Command{
		Name:  "down",
		Usage: "undo up in the safe order: check PostgreSQL is stopped, sync, unmount, detach, stop serve",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "name", Usage: "stack name given to up"},
			&cli.StringFlag{Name: "mount", Usage: "or: its mount point"},
			&cli.StringFlag{Name: "run-dir", Value: defaultRunDir(), Usage: "as given to up"},
		},
		Action: runDown,
	}
}

func runUp(c *cli.Context) error {
	vol, _ := filepath.Abs(c.String("volume"))
	mnt, _ := filepath.Abs(c.String("mount"))
	runDir := c.String("run-dir")
	name := c.String("name")
	if name == "" {
		name = strings.TrimSuffix(filepath.Base(vol), filepath.Ext(vol))
	}
	if err := os.MkdirAll(runDir, 0o700); err != nil {
		return err
	}
	if _, err := os.Stat(statePath(runDir, name)); err == nil {
		return fmt.Errorf("up: stack %q is already up (state in %s); `tdeshim down --name %s` first", name, statePath(runDir, name), name)
	}
	if f, err := store.OpenFile(vol, true); errors.Is(err, store.ErrLocked) {
		return fmt.Errorf("up: %s is already served by another process", vol)
	} else if err != nil {
		return err
	} else {
		f.Close()
	}
	if isMountPoint(mnt) {
		return fmt.Errorf("up: %s is already a mount point", mnt)
	}
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return err
	}
	self, _ := os.Executable()
	st := upState{Name: name, Volume: vol, Mount: mnt, Socket: filepath.Join(runDir, name+".sock"),
		Log: filepath.Join(runDir, name+".serve.log"), Control: runDir}
	logf, err := os.OpenFile(st.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	os.Remove(st.Socket) // stale after a crash; the volume lock says nobody serves it
	args := []string{"serve", "--volume", vol, "--listen", "unix:" + st.Socket, "--control-dir", runDir}
	if !c.Bool("no-watch") {
		abs, err := filepath.Abs(c.String("mount"))
		if err != nil {
			return err
		}
		args = append(args, "--watch", abs)
	}
	args = append(args, c.StringSlice("serve-arg")...)
	cmd := exec.Command(self, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	st.PID = cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	undo := func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
		}
	}
	for i := 0; ; i++ {
		if c, err := net.Dial("unix", st.Socket); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-exited:
			b, _ := os.ReadFile(st.Log)
			return fmt.Errorf("up: serve exited (%v):\n%s", err, tail(string(b), 15))
		case <-time.After(50 * time.Millisecond):
		}
		if i > 1200 {
			undo()
			return errors.New("up: serve did not listen within 60s (KMS unreachable? see " + st.Log + ")")
		}
	}
	via := c.String("via")
	if via == "auto" {
		via = "fuse-loop"
		if attach.KernelAvailable() == nil {
			via = "kernel"
		}
	}
	if via == "kernel" {
		st.Device, err = attach.Kernel(c.Context, st.Socket, 4, false)
	} else {
		st.Device, err = attach.FuseLoop(c.Context, st.Socket, filepath.Join(runDir, name+".fuse"), 4, false)
	}
	if err != nil {
		undo()
		return err
	}
	if !hasExt4(st.Device) {
		fmt.Fprintf(os.Stderr, "no filesystem on %s yet: mkfs.ext4 -b 4096\n", st.Device)
		if out, err := exec.Command("mkfs.ext4", "-q", "-b", "4096", "-L", "tdeshim", st.Device).CombinedOutput(); err != nil {
			detachDev(st.Device)
			undo()
			return fmt.Errorf("up: mkfs.ext4: %v: %s", err, out)
		}
	}
	if out, err := exec.Command("mount", "-o", "nodelalloc,discard", st.Device, mnt).CombinedOutput(); err != nil {
		detachDev(st.Device)
		undo()
		return fmt.Errorf("up: mount: %v: %s", err, out)
	}
	if owner := c.String("owner"); owner != "" {
		exec.Command("chown", owner+":", mnt).Run()
	}
	b, _ := json.MarshalIndent(st, "", "  ")
	if err := os.WriteFile(statePath(runDir, name), b, 0o600); err != nil {
		return err
	}
	fmt.Printf("%s mounted on %s (volume %s, serve pid %d)\n", st.Device, mnt, vol, st.PID)
	return nil
}

func detachDev(dev string) {
	if strings.HasPrefix(filepath.Base(dev), "nbd") {
		attach.DetachKernel(dev)
	} else {
		attach.DetachFuseLoop(dev)
	}
}

// hasExt4 looks for the ext2/3/4 superblock magic (0xEF53 at byte 1080).
func hasExt4(dev string) bool {
	f, err := os.Open(dev)
	if err != nil {
		return false
	}
	defer f.Close()
	b := make([]byte, 2)
	if _, err := f.ReadAt(b, 1080); err != nil {
		return false
	}
	return b[0] == 0x53 && b[1] == 0xEF
}

func runDown(c *cli.Context) error {
	runDir := c.String("run-dir")
	name := c.String("name")
	if name == "" && c.String("mount") != "" {
		mnt, _ := filepath.Abs(c.String("mount"))
		matches, _ := filepath.Glob(filepath.Join(runDir, "*.up.json"))
		for _, m := range matches {
			var st upState
			if b, err := os.ReadFile(m); err == nil && json.Unmarshal(b, &st) == nil && st.Mount == mnt {
				name = st.Name
			}
		}
	}
	if name == "" {
		return errors.New("down: give --name (or --mount) of a stack brought up with `tdeshim up`")
	}
	b, err := os.ReadFile(statePath(runDir, name))
	if err != nil {
		return fmt.Errorf("down: no stack %q in %s", name, runDir)
	}
	var st upState
	if err := json.Unmarshal(b, &st); err != nil {
		return err
	}
	if pid := postgresRunningUnder(st.Mount); pid > 0 {
		return fmt.Errorf("down: PostgreSQL (pid %d) still runs on %s; stop it first (pg_ctl -D … stop -m fast)", pid, st.Mount)
	}
	exec.Command("sync").Run()
	if isMountPoint(st.Mount) {
		if out, err := exec.Command("umount", st.Mount).CombinedOutput(); err != nil {
			return fmt.Errorf("down: umount %s: %v: %s (something still uses it: fuser -vm %s)", st.Mount, err, out, st.Mount)
		}
	}
	detachDev(st.Device)
	if st.PID > 0 && isTdeshimProcess(st.PID) {
		syscall.Kill(st.PID, syscall.SIGTERM)
		for i := 0; i < 600 && syscall.Kill(st.PID, 0) == nil; i++ {
			time.Sleep(50 * time.Millisecond)
		}
		if syscall.Kill(st.PID, 0) == nil {
			return fmt.Errorf("down: serve (pid %d) did not exit within 30s; see %s", st.PID, st.Log)
		}
	}
	os.Remove(statePath(runDir, name))
	fmt.Printf("%s: unmounted, detached, serve stopped\n", name)
	return nil
}

// postgresRunningUnder finds a postmaster.pid under dir (up to two levels)
// whose process is alive.
func postgresRunningUnder(dir string) int {
	for _, pat := range []string{"postmaster.pid", "*/postmaster.pid", "*/*/postmaster.pid"} {
		matches, _ := filepath.Glob(filepath.Join(dir, pat))
		for _, m := range matches {
			b, err := os.ReadFile(m)
			if err != nil {
				continue
			}
			first, _, _ := strings.Cut(string(b), "\n")
			if pid, err := strconv.Atoi(strings.TrimSpace(first)); err == nil && syscall.Kill(pid, 0) == nil {
				return pid
			}
		}
	}
	return 0
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// isTdeshimProcess checks /proc/PID/cmdline before a signal: after a
// reboot a stale state file's PID may belong to anything.
func isTdeshimProcess(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	return len(args) > 1 && strings.Contains(filepath.Base(args[0]), "tdeshim")
}
