package mounts

import "testing"

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{
		`/var/lib/pg`:        "/var/lib/pg",
		`/mnt/with\040space`: "/mnt/with space",
		`/mnt/tab\011x`:      "/mnt/tab\tx",
		`/odd\04`:            `/odd\04`, // too short to be an escape
		`/back\134slash`:     `/back\slash`,
	} {
		if got := unescape(in); got != want {
			t.Errorf("unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestRootIsMounted(t *testing.T) {
	ok, err := IsMountPoint("/")
	if err != nil || !ok {
		t.Fatalf("/ is not a mount point: %v %v", ok, err)
	}
}
