package netmesh

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// MTU of the mesh device: 1500 minus WireGuard's overhead over IPv4/IPv6.
const MTU = 1420

// Device kinds.
const (
	KindKernel    = "kernel"
	KindUserspace = "userspace"
)

// Peer is another machine of the mesh.
type Peer struct {
	PublicKey  wgtypes.Key
	Endpoint   netip.AddrPort // zero: not known yet
	AllowedIPs []netip.Prefix // the peer's overlay /32, later its service /32s
	KeepAlive  time.Duration  // persistent keepalive; 0 = off
}

// Config is the whole desired state of the device.
type Config struct {
	PrivateKey wgtypes.Key
	ListenPort int
	Address    netip.Prefix // this machine's overlay address with the mesh prefix length
	Peers      []Peer
}

// Device is one WireGuard interface, kernel or embedded userspace, always
// configured through wgctrl.
type Device struct {
	name   string
	kind   string
	logger *slog.Logger
	wg     *wgctrl.Client

	mu sync.Mutex // serialises Set and Close

	// userspace only
	dev      *device.Device
	uapi     net.Listener
	serving  sync.WaitGroup
	closeErr error
	closed   bool
}

// Open creates the interface name: kernel WireGuard when the kernel has
// it, else the embedded userspace device with its UAPI socket. A leftover
// interface or UAPI socket of that name (from a killed run) is removed
// first.
func Open(name string, logger *slog.Logger) (*Device, error) {
	if logger == nil {
		logger = slog.Default()
	}
	d := &Device{name: name, logger: logger.With("component", "wireguard", "device", name)}
	if old, err := netlink.LinkByName(name); err == nil {
		// Only a leftover of droverd's own (a kernel device outlives a
		// killed daemon) is removed; anything else is the operator's.
		if old.Attrs().Alias != OwnAlias {
			return nil, fmt.Errorf("interface %s exists and was not made by droverd (its alias is %q, not %q): choose another --wg-interface, or remove it yourself: %w",
				name, old.Attrs().Alias, OwnAlias, ErrNotOurs)
		}
		d.logger.Info("removing a leftover interface droverd made")
		if err := netlink.LinkDel(old); err != nil {
			return nil, fmt.Errorf("removing leftover interface %s: %w", name, err)
		}
	}
	err := netlink.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: MTU}})
	switch {
	case err == nil:
		d.kind = KindKernel
	case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT):
		if err := d.openUserspace(); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("creating WireGuard interface %s: %w", name, err)
	}
	wg, err := wgctrl.New()
	if err != nil {
		d.Close()
		return nil, fmt.Errorf("wgctrl: %w", err)
	}
	d.wg = wg
	if link, err := netlink.LinkByName(name); err != nil {
		d.Close()
		return nil, fmt.Errorf("reading interface %s: %w", name, err)
	} else if err := netlink.LinkSetAlias(link, OwnAlias); err != nil {
		d.Close()
		return nil, fmt.Errorf("marking interface %s as droverd's: %w", name, err)
	}
	d.logger.Info("WireGuard device open", "kind", d.kind)
	return d, nil
}

// OwnAlias marks the interfaces droverd makes (the link's alias), so a
// leftover of its own is told from an interface it must not touch.
const OwnAlias = "droverd"

// ErrNotOurs: an interface of the asked name exists and droverd did not
// make it.
var ErrNotOurs = errors.New("interface not made by droverd")

// wgLogger adapts wireguard-go's printf logger to slog at debug level.
func wgLogger(l *slog.Logger) *device.Logger {
	return &device.Logger{
		Verbosef: func(f string, a ...any) { l.Debug(fmt.Sprintf(f, a...)) },
		Errorf:   func(f string, a ...any) { l.Debug(fmt.Sprintf(f, a...)) },
	}
}

func (d *Device) openUserspace() error {
	// A socket left by a killed daemon blocks UAPIOpen's bind; nobody can
	// be serving it since the interface is gone.
	os.Remove(filepath.Join("/var/run/wireguard", d.name+".sock"))
	t, err := tun.CreateTUN(d.name, MTU)
	if err != nil {
		return fmt.Errorf("creating TUN device %s (is /dev/net/tun there?): %w", d.name, err)
	}
	d.dev = device.NewDevice(t, conn.NewDefaultBind(), wgLogger(d.logger))
	file, err := ipc.UAPIOpen(d.name)
	if err != nil {
		d.dev.Close()
		return fmt.Errorf("opening UAPI socket of %s: %w", d.name, err)
	}
	d.uapi, err = ipc.UAPIListen(d.name, file)
	if err != nil {
		file.Close()
		d.dev.Close()
		return fmt.Errorf("listening on UAPI socket of %s: %w", d.name, err)
	}
	d.kind = KindUserspace
	d.serving.Add(1)
	go func() {
		defer d.serving.Done()
		for {
			c, err := d.uapi.Accept()
			if err != nil {
				return
			}
			d.serving.Add(1)
			go func() {
				defer d.serving.Done()
				d.dev.IpcHandle(c)
			}()
		}
	}()
	return nil
}

// Name is the interface name.
func (d *Device) Name() string { return d.name }

// Kind is KindKernel or KindUserspace.
func (d *Device) Kind() string { return d.kind }

// Set makes the device match cfg: key, port, peers (added, updated and
// removed one by one, so unchanged peers keep their sessions), the
// overlay address, link up, and a route via the device for every allowed
// prefix outside the overlay prefix. Calling it again with the same
// config changes nothing.
func (d *Device) Set(cfg Config) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return errors.New("device closed")
	}
	cur, err := d.wg.Device(d.name)
	if err != nil {
		return fmt.Errorf("reading %s: %w", d.name, err)
	}
	if wc, changed := diff(cur, cfg); changed {
		if err := d.wg.ConfigureDevice(d.name, wc); err != nil {
			return fmt.Errorf("configuring %s: %w", d.name, err)
		}
	}
	link, err := netlink.LinkByName(d.name)
	if err != nil {
		return fmt.Errorf("finding %s: %w", d.name, err)
	}
	if err := setAddress(link, cfg.Address); err != nil {
		return fmt.Errorf("%s: %w", d.name, err)
	}
	if link.Attrs().MTU != MTU {
		if err := netlink.LinkSetMTU(link, MTU); err != nil {
			return fmt.Errorf("%s: setting MTU: %w", d.name, err)
		}
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(link); err != nil {
			return fmt.Errorf("%s: link up: %w", d.name, err)
		}
	}
	if err := setRoutes(link, cfg); err != nil {
		return fmt.Errorf("%s: %w", d.name, err)
	}
	return nil
}

// diff computes the wgctrl change from the device's current state to cfg.
func diff(cur *wgtypes.Device, cfg Config) (wgtypes.Config, bool) {
	var wc wgtypes.Config
	changed := false
	if cur.PrivateKey != cfg.PrivateKey {
		wc.PrivateKey = &cfg.PrivateKey
		changed = true
	}
	if cur.ListenPort != cfg.ListenPort {
		wc.ListenPort = &cfg.ListenPort
		changed = true
	}
	want := map[wgtypes.Key]Peer{}
	for _, p := range cfg.Peers {
		want[p.PublicKey] = p
	}
	have := map[wgtypes.Key]wgtypes.Peer{}
	for _, p := range cur.Peers {
		have[p.PublicKey] = p
		if _, ok := want[p.PublicKey]; !ok {
			wc.Peers = append(wc.Peers, wgtypes.PeerConfig{PublicKey: p.PublicKey, Remove: true})
			changed = true
		}
	}
	for _, p := range cfg.Peers {
		h, ok := have[p.PublicKey]
		if ok && samePeer(h, p) {
			continue
		}
		pc := wgtypes.PeerConfig{PublicKey: p.PublicKey, ReplaceAllowedIPs: true}
		ka := p.KeepAlive
		pc.PersistentKeepaliveInterval = &ka
		if p.Endpoint.IsValid() {
			pc.Endpoint = net.UDPAddrFromAddrPort(p.Endpoint)
		}
		for _, a := range p.AllowedIPs {
			pc.AllowedIPs = append(pc.AllowedIPs, prefixToIPNet(a))
		}
		wc.Peers = append(wc.Peers, pc)
		changed = true
	}
	return wc, changed
}

func unmapped(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func samePeer(h wgtypes.Peer, p Peer) bool {
	if h.PersistentKeepaliveInterval != p.KeepAlive {
		return false
	}
	// wgctrl reads an IPv4 endpoint back as a 16-byte address: compare
	// unmapped, or every pass would rewrite every peer.
	if p.Endpoint.IsValid() && (h.Endpoint == nil || unmapped(h.Endpoint.AddrPort()) != unmapped(p.Endpoint)) {
		return false
	}
	have := make([]string, 0, len(h.AllowedIPs))
	for _, n := range h.AllowedIPs {
		have = append(have, n.String())
	}
	want := make([]string, 0, len(p.AllowedIPs))
	for _, a := range p.AllowedIPs {
		want = append(want, a.Masked().String())
	}
	slices.Sort(have)
	slices.Sort(want)
	return slices.Equal(have, want)
}

func prefixToIPNet(p netip.Prefix) net.IPNet {
	p = p.Masked()
	return net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func setAddress(link netlink.Link, want netip.Prefix) error {
	addrs, err := netlink.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("listing addresses: %w", err)
	}
	found := false
	for _, a := range addrs {
		p, _ := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		if want.IsValid() && netip.PrefixFrom(p.Unmap(), ones) == want {
			found = true
			continue
		}
		if err := netlink.AddrDel(link, &a); err != nil {
			return fmt.Errorf("removing address %s: %w", a.IPNet, err)
		}
	}
	if want.IsValid() && !found {
		ipn := net.IPNet{IP: want.Addr().AsSlice(), Mask: net.CIDRMask(want.Bits(), want.Addr().BitLen())}
		if err := netlink.AddrAdd(link, &netlink.Addr{IPNet: &ipn}); err != nil {
			return fmt.Errorf("adding address %s: %w", want, err)
		}
	}
	return nil
}

// setRoutes keeps exactly one route via the device for every allowed
// prefix outside the overlay prefix (the kernel routes the overlay prefix
// itself because of the address).
func setRoutes(link netlink.Link, cfg Config) error {
	want := map[netip.Prefix]bool{}
	for _, p := range cfg.Peers {
		for _, a := range p.AllowedIPs {
			a = a.Masked()
			if cfg.Address.IsValid() && cfg.Address.Masked().Contains(a.Addr()) && a.Bits() >= cfg.Address.Bits() {
				continue
			}
			want[a] = true
		}
	}
	routes, err := netlink.RouteList(link, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("listing routes: %w", err)
	}
	for _, r := range routes {
		if r.Protocol == unix.RTPROT_KERNEL || r.Dst == nil {
			continue
		}
		dst, _ := netip.AddrFromSlice(r.Dst.IP)
		ones, _ := r.Dst.Mask.Size()
		p := netip.PrefixFrom(dst.Unmap(), ones)
		if want[p] {
			delete(want, p)
			continue
		}
		if err := netlink.RouteDel(&r); err != nil {
			return fmt.Errorf("removing route %s: %w", p, err)
		}
	}
	for p := range want {
		ipn := prefixToIPNet(p)
		if err := netlink.RouteReplace(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: &ipn, Scope: netlink.SCOPE_LINK}); err != nil {
			return fmt.Errorf("adding route %s: %w", p, err)
		}
	}
	return nil
}

// PeerStatus is one peer as the device sees it.
type PeerStatus struct {
	PublicKey     string    `json:"public_key"`
	Endpoint      string    `json:"endpoint"`
	AllowedIPs    []string  `json:"allowed_ips"`
	LastHandshake time.Time `json:"last_handshake"`
	RxBytes       int64     `json:"rx_bytes"`
	TxBytes       int64     `json:"tx_bytes"`
}

// Status is the device as wgctrl reads it.
type Status struct {
	Name       string       `json:"name"`
	Kind       string       `json:"kind"`
	PublicKey  string       `json:"public_key"`
	ListenPort int          `json:"listen_port"`
	Peers      []PeerStatus `json:"peers"`
}

// Status reads the device through wgctrl.
func (d *Device) Status() (Status, error) {
	dev, err := d.wg.Device(d.name)
	if err != nil {
		return Status{}, fmt.Errorf("reading %s: %w", d.name, err)
	}
	st := Status{Name: d.name, Kind: d.kind, PublicKey: dev.PublicKey.String(), ListenPort: dev.ListenPort}
	for _, p := range dev.Peers {
		ps := PeerStatus{PublicKey: p.PublicKey.String(), LastHandshake: p.LastHandshakeTime, RxBytes: p.ReceiveBytes, TxBytes: p.TransmitBytes}
		if p.Endpoint != nil {
			ps.Endpoint = p.Endpoint.String()
		}
		for _, a := range p.AllowedIPs {
			ps.AllowedIPs = append(ps.AllowedIPs, a.String())
		}
		st.Peers = append(st.Peers, ps)
	}
	return st, nil
}

// Close removes the interface and stops everything the Device started.
// Safe to call twice.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return d.closeErr
	}
	d.closed = true
	var errs []error
	if d.wg != nil {
		errs = append(errs, d.wg.Close())
	}
	switch d.kind {
	case KindUserspace:
		errs = append(errs, d.uapi.Close())
		d.dev.Close() // closes the TUN, which removes the interface
		d.serving.Wait()
	case KindKernel:
		if link, err := netlink.LinkByName(d.name); err == nil {
			errs = append(errs, netlink.LinkDel(link))
		}
	}
	d.closeErr = errors.Join(errs...)
	return d.closeErr
}
