package main

import (
	"os"
	"runtime/pprof"
)

// startProfile writes a CPU profile to $TDESHIM_CPUPROFILE until the
// returned function runs: a developer aid for make bench investigations.
func startProfile() func() {
	path := os.Getenv("TDESHIM_CPUPROFILE")
	if path == "" {
		return func() {}
	}
	f, err := os.Create(path)
	if err != nil {
		return func() {}
	}
	pprof.StartCPUProfile(f)
	return func() { pprof.StopCPUProfile(); f.Close() }
}
