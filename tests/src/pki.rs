//! Test certificates made by the `openssl` CLI (EC P-256, valid two days), and a Secret volume
//! updated the way kubelet's atomic writer does it: files in a timestamped directory, the
//! `..data` symlink renamed over to the new directory, each key a symlink through `..data`.
//!
//! Everything lives in temp dirs, removed on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

use tonic::transport::{Certificate, Identity};

/// A directory of CAs and leaves (`NAME.crt`, `NAME.key`).
pub struct Pki {
    dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    pub fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// A self-signed CA `NAME` with subject CN `nodekeeper test NAME`.
    pub fn ca(&self, name: &str) -> &Self {
        openssl(
            self.dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=nodekeeper test {name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
            ],
        );
        self
    }

    /// A server certificate `NAME` (CN `cn`, SANs localhost and 127.0.0.1 plus `extra_sans`,
    /// e.g. `DNS:agent.example`) signed by `ca`.
    pub fn server(&self, name: &str, ca: &str, cn: &str, extra_sans: &str) -> &Self {
        let sans = if extra_sans.is_empty() {
            "DNS:localhost,IP:127.0.0.1".to_string()
        } else {
            format!("DNS:localhost,IP:127.0.0.1,{extra_sans}")
        };
        self.leaf(
            name,
            ca,
            cn,
            &format!("subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
        )
    }

    /// A client certificate `NAME` with CN `cn` signed by `ca`.
    pub fn client(&self, name: &str, ca: &str, cn: &str) -> &Self {
        self.leaf(name, ca, cn, "extendedKeyUsage=clientAuth\n")
    }

    fn leaf(&self, name: &str, ca: &str, cn: &str, ext: &str) -> &Self {
        let d = self.dir.path();
        let ext_file = format!("{name}.ext");
        std::fs::write(
            d.join(&ext_file),
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n{ext}"),
        )
        .expect("write ext");
        openssl(
            d,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext_file,
                "-out",
                &format!("{name}.crt"),
            ],
        );
        self
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn pem(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).expect("read pem")
    }

    pub fn certificate(&self, name: &str) -> Certificate {
        Certificate::from_pem(self.pem(&format!("{name}.crt")))
    }

    pub fn identity(&self, name: &str) -> Identity {
        Identity::from_pem(
            self.pem(&format!("{name}.crt")),
            self.pem(&format!("{name}.key")),
        )
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// A Secret volume as kubelet writes it: `KEY -> ..data/KEY`, `..data -> ..<generation>/`.
pub struct SecretVolume {
    dir: tempfile::TempDir,
    generation: u32,
}

impl SecretVolume {
    /// The volume with its first content.
    pub fn new(files: &[(&str, Vec<u8>)]) -> SecretVolume {
        let mut v = SecretVolume {
            dir: tempfile::tempdir().expect("tempdir"),
            generation: 0,
        };
        v.update(files);
        v
    }

    /// The path of a key, as a pod sees it.
    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.path().join(key)
    }

    /// Swaps in new content: a new directory, then one rename of `..data` (atomic: a reader
    /// sees all old or all new files), then the old directory removed.
    pub fn update(&mut self, files: &[(&str, Vec<u8>)]) {
        let d = self.dir.path();
        self.generation += 1;
        let new = format!("..gen_{}", self.generation);
        std::fs::create_dir(d.join(&new)).expect("mkdir generation");
        for (key, content) in files {
            std::fs::write(d.join(&new).join(key), content).expect("write key");
            let link = d.join(key);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{key}"), &link).expect("key symlink");
            }
        }
        let tmp = d.join("..data_tmp");
        std::os::unix::fs::symlink(&new, &tmp).expect("..data_tmp");
        std::fs::rename(&tmp, d.join("..data")).expect("swap ..data");
        if self.generation > 1 {
            let old = d.join(format!("..gen_{}", self.generation - 1));
            std::fs::remove_dir_all(old).expect("remove old generation");
        }
    }
}
