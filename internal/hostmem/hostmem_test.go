package hostmem

import "testing"

func TestParse(t *testing.T) {
	if got := parse("MemTotal:       24000000 kB\nMemAvailable:    1024 kB\n"); got != 1024<<10 {
		t.Fatalf("parse = %d, want %d", got, 1024<<10)
	}
	if got := parse("MemTotal: 5 kB\n"); got != 0 {
		t.Fatalf("parse without MemAvailable = %d, want 0", got)
	}
	if Available() == 0 {
		t.Fatal("this host reports no available memory")
	}
}
