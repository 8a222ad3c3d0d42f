package e2e

import (
	"cmp"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// figure is one measured quantity: every run's value, summarized by the
// median with min and max.
type figure struct {
	Runs   []float64 `json:"runs"`
	Median float64   `json:"median"`
	Min    float64   `json:"min"`
	Max    float64   `json:"max"`
}

func newFigure(runs []float64) figure {
	if len(runs) == 0 {
		return figure{}
	}
	s := slices.Clone(runs)
	slices.Sort(s)
	med := s[len(s)/2]
	if len(s)%2 == 0 {
		med = (s[len(s)/2-1] + s[len(s)/2]) / 2
	}
	return figure{Runs: runs, Median: med, Min: s[0], Max: s[len(s)-1]}
}

// cell writes a figure as "median (min–max)" with the given format.
func (f figure) cell(format string) string {
	if len(f.Runs) == 0 {
		return "—"
	}
	if len(f.Runs) == 1 {
		return fmt.Sprintf(format, f.Median)
	}
	return fmt.Sprintf(format+" ("+format+"–"+format+")", f.Median, f.Min, f.Max)
}

// ratio is a/b of two medians measured side by side.
func ratio(a, b figure) float64 {
	if b.Median == 0 {
		return 0
	}
	return a.Median / b.Median
}

// table is one section of the report: a title, what was measured and
// how, and rows of cells; Figures holds the same numbers for the JSON.
type table struct {
	Title   string             `json:"title"`
	How     string             `json:"how"`
	Header  []string           `json:"header"`
	Rows    [][]string         `json:"rows"`
	Figures map[string]figure  `json:"figures"`
	Ratios  map[string]float64 `json:"ratios,omitempty"`
}

func (t *table) add(cells ...string) { t.Rows = append(t.Rows, cells) }

func (t *table) figure(key string, runs []float64) figure {
	f := newFigure(runs)
	if t.Figures == nil {
		t.Figures = map[string]figure{}
	}
	t.Figures[key] = f
	return f
}

func (t *table) ratio(key string, r float64) float64 {
	if t.Ratios == nil {
		t.Ratios = map[string]float64{}
	}
	t.Ratios[key] = r
	return r
}

// growth adds a row of how each numeric column grew from row lo to row
// hi (hi's leading number over lo's; a median when the cell is "median
// (min–max)") and records each in Ratios as <key>_<column>. A column
// whose cells hold no number, or a zero at lo, gets "—".
func (t *table) growth(key, label string, lo, hi int) {
	row := []string{label}
	for c := 1; c < len(t.Header); c++ {
		a, okA := leadingNumber(t.Rows[lo][c])
		b, okB := leadingNumber(t.Rows[hi][c])
		if !okA || !okB || a == 0 {
			row = append(row, "—")
			continue
		}
		row = append(row, fmt.Sprintf("%.2f×", b/a))
		t.ratio(key+"_"+columnKey(t.Header[c]), b/a)
	}
	t.add(row...)
}

// leadingNumber reads the number a cell starts with ("4.72 (4.27–5.10)"
// is 4.72, "0 in 40s" is 0).
func leadingNumber(cell string) (float64, bool) {
	f := strings.Fields(cell)
	if len(f) == 0 {
		return 0, false
	}
	v, err := strconv.ParseFloat(f[0], 64)
	return v, err == nil
}

// columnKey makes a column's header a JSON key: "leader CPU (%)" is
// leader_cpu.
func columnKey(header string) string {
	header, _, _ = strings.Cut(header, " (")
	var b strings.Builder
	for _, r := range strings.ToLower(header) {
		switch {
		case r >= 'a' && r <= 'z' || r >= '0' && r <= '9':
			b.WriteRune(r)
		case b.Len() > 0 && !strings.HasSuffix(b.String(), "_"):
			b.WriteByte('_')
		}
	}
	return strings.TrimSuffix(b.String(), "_")
}

// benchReport is what `make bench` writes to bench/results/.
type benchReport struct {
	// Name is the files' stem (lab.md, lab.json when empty) and Heading
	// the markdown's title.
	Name     string            `json:"-"`
	Heading  string            `json:"-"`
	Started  time.Time         `json:"started"`
	Took     string            `json:"took"`
	Machine  map[string]string `json:"machine"`
	Sections []*table          `json:"sections"`
}

// machineFacts states what the numbers ran on.
func machineFacts(bin string) map[string]string {
	first := func(path, key string) string {
		b, _ := os.ReadFile(path)
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == key {
				return strings.TrimSpace(v)
			}
			if k, v, ok := strings.Cut(line, "="); ok && k == key {
				return strings.Trim(v, `"`)
			}
		}
		return "?"
	}
	run := func(name string, args ...string) string {
		out, err := exec.Command(name, args...).Output()
		if err != nil {
			return "?"
		}
		return strings.TrimSpace(string(out))
	}
	return map[string]string{
		"cpu":       fmt.Sprintf("%s, %d cores", first("/proc/cpuinfo", "model name"), runtime.NumCPU()),
		"memory":    first("/proc/meminfo", "MemTotal"),
		"os":        first("/etc/os-release", "PRETTY_NAME"),
		"kernel":    run("uname", "-r"),
		"go":        runtime.Version(),
		"drover":    run(filepath.Join(bin, "droverd"), "--version"),
		"docker":    run("dockerd", "--version"),
		"zfs":       "zfs-fuse " + run("dpkg-query", "-W", "-f", "${Version}", "zfs-fuse"),
		"wireguard": "userspace (wireguard-go in droverd); no kernel module on this machine",
	}
}

// write puts the report as markdown and JSON into dir.
func (r *benchReport) write(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	j, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	var md strings.Builder
	name, heading := cmp.Or(r.Name, "lab"), cmp.Or(r.Heading, "drover benchmarks on the lab")
	fmt.Fprintf(&md, "# %s\n\n", heading)
	fmt.Fprintf(&md, "Run %s, took %s. Every figure is the median of the runs, with (min–max); ratios are of medians measured in the same run.\n\n",
		r.Started.UTC().Format(time.RFC3339), r.Took)
	keys := make([]string, 0, len(r.Machine))
	for k := range r.Machine {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	fmt.Fprintf(&md, "| machine | |\n|---|---|\n")
	for _, k := range keys {
		fmt.Fprintf(&md, "| %s | %s |\n", k, r.Machine[k])
	}
	for _, t := range r.Sections {
		fmt.Fprintf(&md, "\n## %s\n\n%s\n\n", t.Title, t.How)
		fmt.Fprintf(&md, "| %s |\n|%s\n", strings.Join(t.Header, " | "), strings.Repeat("---|", len(t.Header)))
		for _, row := range t.Rows {
			fmt.Fprintf(&md, "| %s |\n", strings.Join(row, " | "))
		}
	}
	if err := writeAtomic(filepath.Join(dir, name+".json"), append(j, '\n')); err != nil {
		return err
	}
	return writeAtomic(filepath.Join(dir, name+".md"), []byte(md.String()))
}

func writeAtomic(path string, b []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func TestGrowthDividesEachNumericColumnOfTwoRows(t *testing.T) {
	tb := &table{Header: []string{"machines", "leader CPU (%)", "cut → failed (s)", "false failed", "voters"}}
	tb.add("10", "11.50", "3.45 (2.51–4.55)", "0 in 40s", "—")
	tb.add("100", "10.10", "4.72 (4.27–5.10)", "2 in 1h", "5")
	tb.growth("100_vs_10", "growth 10 → 100", 0, 1)
	got := tb.Rows[2]
	want := []string{"growth 10 → 100", "0.88×", "1.37×", "—", "—"}
	if !slices.Equal(got, want) {
		t.Fatalf("growth row %q, want %q", got, want)
	}
	if r := tb.Ratios["100_vs_10_leader_cpu"]; r < 0.878 || r > 0.879 {
		t.Fatalf("ratio leader_cpu %v, want 10.10/11.50; ratios %v", r, tb.Ratios)
	}
	if _, ok := tb.Ratios["100_vs_10_cut_failed"]; !ok {
		t.Fatalf("no ratio for the cut → failed column: %v", tb.Ratios)
	}
}
