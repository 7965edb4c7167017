package e2e

import (
	"strings"
	"testing"
	"time"
)

// TestLibnbdInFlightAndErrorReplies uses the libnbd Python binding (a real
// client, run with the system python3) for 64 writes in flight and for bad
// requests, each of which must get the right error on a live connection.
func TestLibnbdInFlightAndErrorReplies(t *testing.T) {
	need(t, "/usr/bin/python3")
	if _, err := run(t, 10*time.Second, "/usr/bin/python3", "-c", "import nbd"); err != nil {
		need(t, "python3-libnbd") // reports how to install
	}
	f := newVolume(t, "64M")
	s := startServe(t, f)
	out, err := run(t, 2*time.Minute, "/usr/bin/python3", "testdata/inflight_and_errors.py", s.uri())
	if err != nil || !strings.Contains(out, "ok") {
		t.Fatalf("libnbd script: %v\n%s\nserver log:\n%s", err, out, s.log)
	}
}
