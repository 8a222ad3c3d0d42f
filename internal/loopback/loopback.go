// Package loopback puts service IPs on this host's loopback as /32s:
// Docker publishes a service's ports there, and the mesh routes the
// address to the machine that owns the service.
package loopback

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Addresses changes the service IPs of one range on the loopback.
type Addresses struct {
	Prefix netip.Prefix // the service range; addresses outside it are never touched
}

// Add puts one service IP on the loopback; already there is fine.
func (a Addresses) Add(ip netip.Addr) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if err := netlink.AddrAdd(lo, hostAddr(ip)); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("adding service IP %s: %w", ip, err)
	}
	return nil
}

// Remove takes one service IP off the loopback; already gone is fine.
func (a Addresses) Remove(ip netip.Addr) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	if err := netlink.AddrDel(lo, hostAddr(ip)); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
		return fmt.Errorf("removing service IP %s: %w", ip, err)
	}
	return nil
}

// Set makes the /32s of the range on the loopback exactly want.
func (a Addresses) Set(want []netip.Addr) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("loopback: %w", err)
	}
	addrs, err := netlink.AddrList(lo, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("loopback addresses: %w", err)
	}
	wantSet := map[netip.Addr]bool{}
	for _, ip := range want {
		wantSet[ip] = true
	}
	for _, have := range addrs {
		ip, _ := netip.AddrFromSlice(have.IP)
		ip = ip.Unmap()
		ones, _ := have.Mask.Size()
		if ones != 32 || !a.Prefix.Contains(ip) {
			continue
		}
		if wantSet[ip] {
			delete(wantSet, ip)
			continue
		}
		if err := netlink.AddrDel(lo, &have); err != nil {
			return fmt.Errorf("removing service IP %s: %w", ip, err)
		}
	}
	for ip := range wantSet {
		if err := netlink.AddrAdd(lo, hostAddr(ip)); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("adding service IP %s: %w", ip, err)
		}
	}
	return nil
}

func hostAddr(ip netip.Addr) *netlink.Addr {
	return &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(32, 32)}}
}

// nonlocalBindSysctl lets a process bind an address the host does not
// (yet) hold.
const nonlocalBindSysctl = "/proc/sys/net/ipv4/ip_nonlocal_bind"

// AllowNonlocalBind lets Docker publish a service's ports on its service
// IP before this machine holds that IP: a migration's target starts the
// service before the commit, and only the owner may hold the address —
// a client on the target's own host must reach the owner, not a copy
// that may yet be thrown away.
func AllowNonlocalBind() error {
	if b, err := os.ReadFile(nonlocalBindSysctl); err == nil && len(b) > 0 && b[0] == '1' {
		return nil
	}
	if err := os.WriteFile(nonlocalBindSysctl, []byte("1\n"), 0o644); err != nil {
		return fmt.Errorf("allowing binds to service IPs not held yet (%s): %w", nonlocalBindSysctl, err)
	}
	return nil
}
