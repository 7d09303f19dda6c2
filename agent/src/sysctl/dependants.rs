//! Keys whose write the kernel propagates to other keys, so that rewriting the old value of the
//! key alone does not undo the change (Documentation/networking/ip-sysctl.rst, and
//! net/ipv4/devinet.c, net/ipv6/addrconf.c for what the text leaves out).
//!
//! Before such a key is written its dependants' values are recorded beside its original; a
//! restore writes the key, then every dependant that no longer holds its recorded value. Owns the
//! model only; never writes.

use super::apply::SysctlFs;

/// Paths (under `/proc/sys`) the kernel changes when `key` is written, besides `key` itself.
///
/// - `net.ipv4.ip_forward` == `net.ipv4.conf.all.forwarding`: sets `forwarding` on `default`
///   and every interface, and `conf.all.accept_redirects` to the opposite ("its change resets
///   all configuration parameters to their default state").
/// - `net.ipv6.conf.all.forwarding`, `net.ipv6.conf.all.disable_ipv6`: "changing this value is
///   the same as changing conf/default and all per-interface settings to the same value".
/// - `net.ipv6.conf.all.ignore_routes_with_linkdown`: the text is silent, but addrconf.c
///   (`addrconf_fixup_linkdown`) copies it to `default` and every interface like forwarding.
/// - `net.ipv4.conf.default.X`: copied to every interface that never had X set explicitly.
///
/// Other `conf.all.*` keys are combined with the per-interface value (OR / max) when read and
/// never written through, so restoring the key itself undoes them.
pub fn dependants(fs: &SysctlFs, key: &str) -> Vec<String> {
    let own = key.replace('.', "/");
    let mut out = match key {
        "net.ipv4.ip_forward" | "net.ipv4.conf.all.forwarding" => {
            let mut v = per_interface(fs, "ipv4", "forwarding", true);
            v.push("net/ipv4/ip_forward".into());
            v.push("net/ipv4/conf/all/accept_redirects".into());
            v
        }
        "net.ipv6.conf.all.forwarding" => per_interface(fs, "ipv6", "forwarding", true),
        "net.ipv6.conf.all.disable_ipv6" => per_interface(fs, "ipv6", "disable_ipv6", true),
        // addrconf_fixup_linkdown: a write of `all` is copied to `default` and every interface.
        "net.ipv6.conf.all.ignore_routes_with_linkdown" => {
            per_interface(fs, "ipv6", "ignore_routes_with_linkdown", true)
        }
        _ => match key.strip_prefix("net.ipv4.conf.default.") {
            Some(leaf) if !leaf.contains('.') => per_interface(fs, "ipv4", leaf, false)
                .into_iter()
                .filter(|p| !p.starts_with("net/ipv4/conf/default/"))
                .collect(),
            _ => Vec::new(),
        },
    };
    out.retain(|p| *p != own);
    out.sort();
    out.dedup();
    out
}

/// Whether writing `key` changes other keys: such keys are written before the rest of a set, so
/// a key the set names explicitly is not overwritten by the propagation after it was set.
pub fn propagates(key: &str) -> bool {
    matches!(
        key,
        "net.ipv4.ip_forward"
            | "net.ipv4.conf.all.forwarding"
            | "net.ipv6.conf.all.forwarding"
            | "net.ipv6.conf.all.disable_ipv6"
            | "net.ipv6.conf.all.ignore_routes_with_linkdown"
    ) || key.starts_with("net.ipv4.conf.default.")
}

/// `net/<family>/conf/<dev>/<leaf>` for every device directory (with `all`, `default` when
/// `with_all`), that exists.
fn per_interface(fs: &SysctlFs, family: &str, leaf: &str, with_all: bool) -> Vec<String> {
    let conf = format!("net/{family}/conf");
    let Ok(entries) = std::fs::read_dir(fs.path(&conf)) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|dev| with_all || dev != "all")
        .map(|dev| format!("{conf}/{dev}/{leaf}"))
        .filter(|p| fs.path(p).exists())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[&str]) -> (tempfile::TempDir, SysctlFs) {
        let dir = tempfile::tempdir().unwrap();
        for path in files {
            let p = dir.path().join("sys").join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "0\n").unwrap();
        }
        let fs = SysctlFs::new(dir.path());
        (dir, fs)
    }

    #[test]
    fn ip_forward_reaches_every_interface_and_accept_redirects() {
        let (_d, fs) = tree(&[
            "net/ipv4/ip_forward",
            "net/ipv4/conf/all/forwarding",
            "net/ipv4/conf/all/accept_redirects",
            "net/ipv4/conf/default/forwarding",
            "net/ipv4/conf/eth0/forwarding",
            "net/ipv4/conf/lo/forwarding",
        ]);
        assert_eq!(
            dependants(&fs, "net.ipv4.ip_forward"),
            [
                "net/ipv4/conf/all/accept_redirects",
                "net/ipv4/conf/all/forwarding",
                "net/ipv4/conf/default/forwarding",
                "net/ipv4/conf/eth0/forwarding",
                "net/ipv4/conf/lo/forwarding",
            ]
        );
        assert!(
            dependants(&fs, "net.ipv4.conf.all.forwarding").contains(&"net/ipv4/ip_forward".into())
        );
        assert!(dependants(&fs, "net.core.somaxconn").is_empty());
        assert!(dependants(&fs, "net.ipv4.conf.all.rp_filter").is_empty());
    }

    #[test]
    fn ipv4_default_reaches_interfaces_but_not_all() {
        let (_d, fs) = tree(&[
            "net/ipv4/conf/all/rp_filter",
            "net/ipv4/conf/default/rp_filter",
            "net/ipv4/conf/eth0/rp_filter",
        ]);
        assert_eq!(
            dependants(&fs, "net.ipv4.conf.default.rp_filter"),
            ["net/ipv4/conf/eth0/rp_filter"]
        );
        assert!(propagates("net.ipv4.conf.default.rp_filter"));
        assert!(!propagates("net.ipv4.conf.eth0.rp_filter"));
    }
}
