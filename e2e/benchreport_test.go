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
	"strings"
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
