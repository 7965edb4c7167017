package walwatch

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/tdeshim/tdeshim/layout"
)

// ParsePath classifies a file by its path relative to the data directory
// (slash-separated), as PostgreSQL names them:
//
//	base/<db>/<relfilenode>[_fsm|_vm|_init][.<segment>]      tablespace pg_default
//	global/<relfilenode>[…]                                  pg_global, database 0
//	pg_tblspc/<spc>/PG_<ver>_<catver>/<db>/<relfilenode>[…]  tablespace spc
//	pg_wal/<24 hex digits>[.partial], pg_wal/xlogtemp.<pid>  WAL
//
// Anything else (temporary relations t<n>_<rel>, pg_xact, configuration,
// logs …) is KindVolume.
func ParsePath(rel string) layout.Owner {
	vol := layout.Owner{Kind: layout.KindVolume}
	parts := strings.Split(rel, "/")
	switch {
	case len(parts) == 3 && parts[0] == "base":
		db, ok := oid(parts[1])
		if !ok {
			return vol
		}
		return relFile(layout.DefaultTablespace, db, parts[2])
	case len(parts) == 2 && parts[0] == "global":
		return relFile(layout.GlobalTablespace, 0, parts[1])
	case len(parts) == 5 && parts[0] == "pg_tblspc" && strings.HasPrefix(parts[2], "PG_"):
		spc, ok1 := oid(parts[1])
		db, ok2 := oid(parts[3])
		if !ok1 || !ok2 {
			return vol
		}
		return relFile(spc, db, parts[4])
	case len(parts) == 2 && parts[0] == "pg_wal" && isWALName(parts[1]):
		return layout.Owner{Kind: layout.KindWAL}
	}
	return vol
}

func isWALName(n string) bool {
	if strings.HasPrefix(n, "xlogtemp.") {
		return true
	}
	n = strings.TrimSuffix(n, ".partial")
	if len(n) != 24 {
		return false
	}
	for _, c := range n {
		if !(c >= '0' && c <= '9' || c >= 'A' && c <= 'F') {
			return false
		}
	}
	return true
}

// oid parses a decimal OID (1 .. 2^32-1, no sign, no leading zero).
func oid(s string) (uint32, bool) {
	if s == "" || s[0] == '0' || len(s) > 10 {
		return 0, false
	}
	for _, c := range s {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseUint(s, 10, 32)
	return uint32(n), err == nil
}

// relFile parses <relfilenode>[_fork][.segment].
func relFile(spc, db uint32, name string) layout.Owner {
	vol := layout.Owner{Kind: layout.KindVolume}
	seg := uint32(0)
	if i := strings.IndexByte(name, '.'); i >= 0 {
		s, ok := oid(name[i+1:])
		if !ok {
			return vol
		}
		seg, name = s, name[:i]
	}
	fork := uint8(layout.ForkMain)
	if i := strings.IndexByte(name, '_'); i >= 0 {
		switch name[i+1:] {
		case "fsm":
			fork = layout.ForkFSM
		case "vm":
			fork = layout.ForkVM
		case "init":
			fork = layout.ForkInit
		default:
			return vol
		}
		name = name[:i]
	}
	rn, ok := oid(name)
	if !ok {
		return vol
	}
	return layout.Owner{Kind: layout.KindRelation, Rel: layout.RelKey{Tablespace: spc, Database: db, RelNode: rn}, Fork: fork, Segment: seg}
}

// Tablespaces maps each tablespace directory a data directory links to
// (pg_tblspc/<oid>, symlinks resolved) to its OID: a file under such a
// directory is ParsePath("pg_tblspc/<oid>/" + its path below it).
func Tablespaces(dataDir string) map[string]uint32 {
	out := map[string]uint32{}
	ents, err := os.ReadDir(filepath.Join(dataDir, "pg_tblspc"))
	if err != nil {
		return out
	}
	for _, e := range ents {
		o, ok := oid(e.Name())
		if !ok {
			continue
		}
		if target, err := filepath.EvalSymlinks(filepath.Join(dataDir, "pg_tblspc", e.Name())); err == nil {
			out[target] = o
		}
	}
	return out
}
