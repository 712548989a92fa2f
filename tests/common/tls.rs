//! Test certificates for NBD TLS (and the other TLS links: peers, etcd), made with the `openssl` command-line tool.
//!
//! Why the CLI and not `rcgen`: no new dependency, and `openssl ca` sets any validity period, so
//! an expired certificate is made directly instead of by waiting or faking the clock. The files
//! are laid out as the clients want them: a directory per client identity with `ca-cert.pem`,
//! `client-cert.pem` and `client-key.pem` is what qemu's `tls-creds-x509,dir=` and libnbd's
//! `tls-certificates=` read (both GnuTLS).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::run_ok;

/// A CA and certificates it signed, in one directory.
pub struct Pki {
    pub dir: PathBuf,
    pub name: String,
}

const SERVER_EXT: &str =
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n";
/// A server certificate for a host name only ([`NAMED_HOST`]), not the address it is dialled at.
const NAMED_EXT: &str =
    "subjectAltName=DNS:node-a.vstor.test\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n";
/// The one name a [`Pki::server_named`] certificate carries.
pub const NAMED_HOST: &str = "node-a.vstor.test";
const CLIENT_EXT: &str = "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n";
/// A cluster member's certificate for internal mutual TLS: server and client at once.
const PEER_EXT: &str = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n";

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args));
}

impl Pki {
    /// A fresh CA named `name` in `root/name`.
    pub fn new(root: &Path, name: &str) -> Self {
        super::require_tool("openssl");
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki {
            dir,
            name: name.to_string(),
        };
        pki.key("ca-key.pem");
        openssl(
            &pki.dir,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-days",
                "30",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        std::fs::write(pki.dir.join("index.txt"), "").unwrap();
        std::fs::write(pki.dir.join("serial"), "10\n").unwrap();
        std::fs::write(
            pki.dir.join("ca.cnf"),
            format!(
                "[ca]\ndefault_ca = tca\n[tca]\ndatabase = index.txt\nnew_certs_dir = .\n\
                 serial = serial\ndefault_md = sha256\npolicy = anything\nunique_subject = no\n\
                 [anything]\ncommonName = supplied\n[server]\n{SERVER_EXT}[client]\n{CLIENT_EXT}\
                 [peer]\n{PEER_EXT}[named]\n{NAMED_EXT}"
            ),
        )
        .unwrap();
        pki
    }

    fn key(&self, file: &str) {
        openssl(
            &self.dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                file,
            ],
        );
    }

    /// Sign a new key for `cn` as `<stem>-cert.pem`/`<stem>-key.pem`; `expired`: valid only in
    /// 2020. `extensions`: the `ca.cnf` section (`server`: for 127.0.0.1/localhost, `client`,
    /// `peer`: both, for 127.0.0.1/localhost).
    fn issue(&self, stem: &str, cn: &str, extensions: &str, expired: bool) -> (PathBuf, PathBuf) {
        let (cert, key, csr) = (
            format!("{stem}-cert.pem"),
            format!("{stem}-key.pem"),
            format!("{stem}.csr"),
        );
        self.key(&key);
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-key",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        let mut args = vec![
            "ca",
            "-batch",
            "-notext",
            "-config",
            "ca.cnf",
            "-cert",
            "ca-cert.pem",
            "-keyfile",
            "ca-key.pem",
            "-in",
            &csr,
            "-out",
            &cert,
            "-extensions",
        ];
        args.push(extensions);
        if expired {
            args.extend([
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20210101000000Z",
            ]);
        } else {
            args.extend(["-days", "30"]);
        }
        openssl(&self.dir, &args);
        (self.dir.join(cert), self.dir.join(key))
    }

    /// A server certificate and key for 127.0.0.1.
    pub fn server(&self, stem: &str, expired: bool) -> (PathBuf, PathBuf) {
        self.issue(stem, "localhost", "server", expired)
    }

    /// A server certificate and key that name only [`NAMED_HOST`]: dialled at 127.0.0.1, a
    /// client must be told which name to check.
    pub fn server_named(&self, stem: &str) -> (PathBuf, PathBuf) {
        self.issue(stem, NAMED_HOST, "named", false)
    }

    /// A client certificate and key for `cn` (`--etcd-cert/--etcd-key`).
    pub fn client(&self, stem: &str, cn: &str) -> (PathBuf, PathBuf) {
        self.issue(stem, cn, "client", false)
    }

    /// A cluster member's certificate and key for 127.0.0.1 (`--peer-tls-cert/key`).
    pub fn peer(&self, stem: &str) -> (PathBuf, PathBuf) {
        self.issue(stem, stem, "peer", false)
    }

    /// A client credentials directory: this CA (to check the server), and, unless `cn` is
    /// `None`, a client certificate for `cn` signed by `signer` (expired if asked).
    pub fn client_dir(&self, root: &Path, name: &str, cn: Option<(&str, &Pki, bool)>) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(self.ca(), dir.join("ca-cert.pem")).unwrap();
        if let Some((cn, signer, expired)) = cn {
            let (cert, key) = signer.issue(name, cn, "client", expired);
            std::fs::copy(cert, dir.join("client-cert.pem")).unwrap();
            std::fs::copy(key, dir.join("client-key.pem")).unwrap();
        }
        dir
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }

    /// `--peer-tls-*` flags of a new cluster member `stem` of this CA, trusting this CA.
    pub fn peer_flags(&self, stem: &str) -> Vec<String> {
        peer_tls_flags(&self.peer(stem), &self.ca())
    }
}

/// `--peer-tls-*` flags for a certificate and key and a CA.
pub fn peer_tls_flags((cert, key): &(PathBuf, PathBuf), ca: &Path) -> Vec<String> {
    vec![
        "--peer-tls-cert".into(),
        cert.display().to_string(),
        "--peer-tls-key".into(),
        key.display().to_string(),
        "--peer-tls-ca".into(),
        ca.display().to_string(),
    ]
}

/// Flags that each take a file: `--flag PATH ...`.
pub fn file_flags(pairs: &[(&str, &Path)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .collect()
}

/// Borrowed flags, as the process helpers take them.
pub fn strs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}

/// An `nbds://` URI for libnbd (nbdinfo, nbdcopy) with the credentials directory `dir`.
pub fn nbds_uri(nbd_addr: &str, volume: &str, dir: &Path) -> String {
    format!(
        "nbds://{nbd_addr}/{volume}?tls-certificates={}",
        dir.display()
    )
}

/// qemu's arguments for export `volume` at `nbd_addr` over TLS with the credentials in `dir`
/// (`tls-creds-x509`).
pub fn qemu_tls_args(nbd_addr: &str, volume: &str, dir: &Path) -> Vec<String> {
    let (host, port) = nbd_addr.rsplit_once(':').unwrap();
    vec![
        "--object".into(),
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            dir.display()
        ),
        "--image-opts".into(),
        format!("driver=nbd,host={host},port={port},export={volume},tls-creds=tls0"),
    ]
}
