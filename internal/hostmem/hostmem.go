// Package hostmem reads how much memory this host has available.
package hostmem

import (
	"os"
	"strconv"
	"strings"
)

// Available is MemAvailable of /proc/meminfo in bytes; 0 when unknown.
func Available() uint64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	return parse(string(b))
}

func parse(meminfo string) uint64 {
	for _, line := range strings.Split(meminfo, "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemAvailable:" {
			kb, _ := strconv.ParseUint(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}
