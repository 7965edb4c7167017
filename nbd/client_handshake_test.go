package nbd_test

import (
	"net"
	"testing"

	"github.com/tdeshim/tdeshim/nbd"
)

func TestClientHandshakeThenSimpleReplies(t *testing.T) {
	sock, _, v, _ := newFixture(t)
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ex, err := nbd.ClientHandshake(c, "")
	if err != nil {
		t.Fatal(err)
	}
	if ex.Size != uint64(v.Size()) || ex.Flags&(1<<2) == 0 || ex.Flags&(1<<8) == 0 {
		t.Fatalf("export %+v: size or flags wrong", ex)
	}
	// The connection is in transmission with simple replies, as the
	// kernel expects.
	rc := &rawClient{t: t, c: c}
	rc.send(cmdWrite, 0, 7, 0, 4096, fill(4096, 1))
	if r := rc.recv(nil); r.err != 0 || r.handle != 7 {
		t.Fatalf("write after handshake: %+v", r)
	}
}
