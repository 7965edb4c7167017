package attach

import (
	"context"
	"errors"
	"os"
)

// ErrNoNBDModule means the kernel NBD client is not available here.
var ErrNoNBDModule = errors.New("the kernel has no nbd module loaded (try `modprobe nbd`), or /dev/nbd0 is missing; use --via fuse-loop")

// KernelAvailable reports whether the kernel NBD client can be used.
func KernelAvailable() error {
	if _, err := os.Stat("/sys/module/nbd"); err != nil {
		return ErrNoNBDModule
	}
	if _, err := os.Stat("/dev/nbd0"); err != nil {
		return ErrNoNBDModule
	}
	return nil
}

// Kernel attaches through the kernel NBD client over netlink.
func Kernel(ctx context.Context, socket string, conns int, readOnly bool) (string, error) {
	if err := KernelAvailable(); err != nil {
		return "", err
	}
	return "", errors.New("attach --via kernel: not implemented yet in this build; use --via fuse-loop")
}

// DetachKernel disconnects /dev/nbdN.
func DetachKernel(dev string) error {
	if err := KernelAvailable(); err != nil {
		return err
	}
	return errors.New("detach of kernel NBD devices: not implemented yet in this build")
}
