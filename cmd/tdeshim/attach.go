package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/tdeshim/tdeshim/attach"
	"github.com/tdeshim/tdeshim/internal/mounts"
)

func attachCommand() *cli.Command {
	return &cli.Command{
		Name:      "attach",
		Usage:     "make a served volume a local block device; prints its path",
		ArgsUsage: " ",
		Description: `Connects to a running serve and prints the block device path on stdout.

   --via kernel     the kernel NBD client (/dev/nbdN); needs the nbd module
   --via fuse-loop  nbdfuse + a loop device (direct I/O, 4 KiB sectors), for
                    machines and containers without the nbd module
   --via auto       kernel if the nbd module is loaded, else fuse-loop

Then: mkfs.ext4 -b 4096 DEVICE (first use); mount -o nodelalloc,discard.
Undo with: tdeshim detach DEVICE`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "socket", Required: true, Usage: "unix socket of tdeshim serve"},
			&cli.StringFlag{Name: "via", Value: "auto", Usage: "kernel, fuse-loop or auto"},
			&cli.StringFlag{Name: "mount-dir", Usage: "fuse-loop: where nbdfuse mounts its file (default: next to the socket)"},
			&cli.IntFlag{Name: "connections", Value: 4, Usage: "NBD connections"},
			&cli.BoolFlag{Name: "read-only", Usage: "attach read-only"},
		},
		Action: func(c *cli.Context) error {
			via := c.String("via")
			if via == "auto" {
				via = "fuse-loop"
				if attach.KernelAvailable() == nil {
					via = "kernel"
				}
			}
			sock := c.String("socket")
			switch via {
			case "kernel":
				dev, err := attach.Kernel(context.Background(), sock, c.Int("connections"), c.Bool("read-only"))
				if err != nil {
					return err
				}
				fmt.Println(dev)
				return nil
			case "fuse-loop":
				dir := c.String("mount-dir")
				if dir == "" {
					dir = strings.TrimSuffix(sock, filepath.Ext(sock)) + ".fuse"
				}
				dev, err := attach.FuseLoop(context.Background(), sock, dir, c.Int("connections"), c.Bool("read-only"))
				if err != nil {
					return err
				}
				fmt.Println(dev)
				return nil
			}
			return fmt.Errorf("--via %q: want kernel, fuse-loop or auto", via)
		},
	}
}

func detachCommand() *cli.Command {
	return &cli.Command{
		Name:      "detach",
		Usage:     "release a block device made by attach",
		ArgsUsage: "DEVICE",
		Description: `Unmount any filesystem on DEVICE first. For a loop device over nbdfuse,
releases the loop device and unmounts nbdfuse; for /dev/nbdN, disconnects
the kernel client. serve keeps running.`,
		Action: func(c *cli.Context) error {
			dev := c.Args().First()
			if dev == "" {
				return errors.New("detach: name the device, e.g. tdeshim detach /dev/loop0")
			}
			if mounted, where := isMounted(dev); mounted {
				return fmt.Errorf("detach %s: still mounted on %s; unmount it first (after stopping PostgreSQL)", dev, where)
			}
			if strings.HasPrefix(filepath.Base(dev), "nbd") {
				return attach.DetachKernel(dev)
			}
			return attach.DetachFuseLoop(dev)
		},
	}
}

// isMounted reports whether dev is mounted, and where.
func isMounted(dev string) (bool, string) {
	where, ok := mounts.MountedAt(dev)
	return ok, where
}

// isMountPoint reports whether something is mounted on dir.
func isMountPoint(dir string) bool {
	ok, _ := mounts.IsMountPoint(dir)
	return ok
}
