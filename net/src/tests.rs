//! Unit tests: PEM loading errors, server names, and a mutual-TLS exchange over [`PeerStream`]
//! with certificates made by the `openssl` command-line tool (as the root crate's tests do).

use std::path::{Path, PathBuf};
use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA in `dir/name` and one peer certificate for 127.0.0.1 it signed.
fn pki(dir: &Path, name: &str) -> PeerTlsFiles {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    for key in ["ca-key.pem", "key.pem"] {
        openssl(
            &d,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                key,
            ],
        );
    }
    openssl(
        &d,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca-key.pem",
            "-out",
            "ca.pem",
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
    std::fs::write(
        d.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        &d,
        &[
            "req", "-new", "-key", "key.pem", "-out", "peer.csr", "-subj", "/CN=peer",
        ],
    );
    openssl(
        &d,
        &[
            "x509",
            "-req",
            "-in",
            "peer.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
        ],
    );
    PeerTlsFiles {
        cert: d.join("cert.pem"),
        key: d.join("key.pem"),
        ca: d.join("ca.pem"),
    }
}

fn file_error_of(files: &PeerTlsFiles) -> (&'static str, PathBuf) {
    match PeerTls::load(files) {
        Err(NetError::File { what, path, .. }) => (what, path),
        other => panic!("expected a file error, got {other:?}"),
    }
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = pki(dir.path(), "cluster");
    PeerTls::load(&good).unwrap();

    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();

    let f = PeerTlsFiles {
        cert: missing.clone(),
        ..good.clone()
    };
    assert_eq!(file_error_of(&f), ("certificate", missing.clone()));
    let f = PeerTlsFiles {
        key: not_pem.clone(),
        ..good.clone()
    };
    assert_eq!(file_error_of(&f), ("private key", not_pem.clone()));
    let f = PeerTlsFiles {
        ca: not_pem.clone(),
        ..good.clone()
    };
    assert_eq!(file_error_of(&f), ("CA certificate", not_pem.clone()));
    // The key of another certificate.
    let other = pki(dir.path(), "other");
    let f = PeerTlsFiles {
        key: other.key.clone(),
        ..good.clone()
    };
    assert_eq!(
        file_error_of(&f),
        ("certificate and key", good.cert.clone())
    );
    let msg = PeerTls::load(&PeerTlsFiles {
        ca: missing.clone(),
        ..good
    })
    .unwrap_err()
    .to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
}

#[test]
fn server_names_come_from_the_dialled_host() {
    assert_eq!(
        server_name("10.0.0.5:7820").unwrap(),
        ServerName::try_from("10.0.0.5").unwrap()
    );
    assert_eq!(
        server_name("[::1]:7820").unwrap(),
        ServerName::try_from("::1").unwrap()
    );
    assert_eq!(
        server_name("dtl.example:7820").unwrap(),
        ServerName::try_from("dtl.example").unwrap()
    );
    assert!(matches!(
        server_name("no-port"),
        Err(NetError::ServerName { .. })
    ));
}

/// One connection: the server echoes what it reads back, upper-cased.
async fn exchange(
    server: Option<PeerTls>,
    client: Option<PeerTls>,
    dial: &str,
) -> (Result<Vec<u8>, String>, Result<bool, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut s = match &server {
            Some(tls) => tls.accept(tcp).await.map_err(|e| e.to_string())?,
            None => PeerStream::from(tcp),
        };
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        buf.make_ascii_uppercase();
        s.write_all(&buf).await.map_err(|e| e.to_string())?;
        s.shutdown().await.map_err(|e| e.to_string())?;
        Ok(s.is_tls())
    });
    let addr = format!("{dial}:{port}");
    let client = async {
        let tcp = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let mut s = match &client {
            Some(tls) => tls.connect(&addr, tcp).await.map_err(|e| e.to_string())?,
            None => PeerStream::from(tcp),
        };
        s.write_all(b"hello").await.map_err(|e| e.to_string())?;
        s.flush().await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        Ok(buf)
    };
    let got = client.await;
    (got, srv.await.unwrap())
}

#[tokio::test]
async fn plain_and_mutual_tls_streams_carry_data() {
    let dir = tempfile::tempdir().unwrap();
    let tls = PeerTls::load(&pki(dir.path(), "cluster")).unwrap();
    let (got, srv) = exchange(None, None, "127.0.0.1").await;
    assert_eq!(got.unwrap(), b"HELLO");
    assert!(!srv.unwrap());
    let (got, srv) = exchange(Some(tls.clone()), Some(tls), "127.0.0.1").await;
    assert_eq!(got.unwrap(), b"HELLO");
    assert!(srv.unwrap());
}

#[tokio::test]
async fn foreign_plain_and_misnamed_clients_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tls = PeerTls::load(&pki(dir.path(), "cluster")).unwrap();
    let foreign = PeerTls::load(&pki(dir.path(), "foreign")).unwrap();

    // A certificate of another CA: the server refuses it at the handshake.
    let (got, srv) = exchange(Some(tls.clone()), Some(foreign), "127.0.0.1").await;
    assert!(got.is_err());
    let srv = srv.unwrap_err();
    assert!(srv.contains("TLS handshake"), "{srv}");

    // No TLS at all.
    let (got, srv) = exchange(Some(tls.clone()), None, "127.0.0.1").await;
    // (It reads the server's TLS alert, never the answer.)
    assert_ne!(got.ok().as_deref(), Some(&b"HELLO"[..]));
    assert!(srv.unwrap_err().contains("TLS handshake"));

    // The certificate is for 127.0.0.1, not for "localhost": the client refuses the server.
    let (got, _) = exchange(Some(tls.clone()), Some(tls), "localhost").await;
    let got = got.unwrap_err();
    assert!(got.contains("not valid for name"), "{got}");
}

/// Copy the identity `from` over the files of `to` (a renewal tool writing new files in place).
fn overwrite(to: &PeerTlsFiles, from: &PeerTlsFiles) {
    for (dst, src) in [
        (&to.cert, &from.cert),
        (&to.key, &from.key),
        (&to.ca, &from.ca),
    ] {
        std::fs::copy(src, dst).unwrap();
    }
}

#[tokio::test]
async fn a_reload_moves_every_clone_to_the_new_files_and_a_broken_one_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let files = pki(dir.path(), "cluster");
    let rotated = pki(dir.path(), "rotated");
    let tls = PeerTls::load(&files).unwrap();
    let server = tls.clone();
    // A peer that keeps the old identity (loaded on its own: no reload reaches it).
    let old = PeerTls::load(&files).unwrap();
    assert!(!tls.reload().unwrap(), "unchanged files are not reloaded");

    overwrite(&files, &rotated);
    let new = PeerTls::load(&rotated).unwrap();
    // Before the reload the files changed but the identity in use did not.
    let (got, _) = exchange(Some(server.clone()), Some(new.clone()), "127.0.0.1").await;
    assert!(got.is_err(), "the old identity refuses the new CA's client");
    assert!(tls.reload().unwrap());
    // The clone held by the "server" follows the reload made through another clone.
    let (got, srv) = exchange(Some(server.clone()), Some(new.clone()), "127.0.0.1").await;
    assert_eq!(got.unwrap(), b"HELLO");
    assert!(srv.unwrap());
    let (got, _) = exchange(Some(server.clone()), Some(old), "127.0.0.1").await;
    assert!(
        got.is_err(),
        "the old CA's client is refused after the rotation"
    );

    // A key that does not fit the certificate (a renewal half done): an error naming the files,
    // and the rotated identity stays in use.
    std::fs::copy(&files.ca, &files.key).unwrap();
    let err = tls.reload().unwrap_err().to_string();
    assert!(err.contains("key"), "{err}");
    let (got, _) = exchange(Some(server), Some(new), "127.0.0.1").await;
    assert_eq!(got.unwrap(), b"HELLO");
}

/// One connection through `accept_peer`/`connect_peer`, the client's halves split: the server
/// upper-cases what it reads; `Accepted::PlainRefused` answers "REFUSED".
async fn split_exchange(server: Option<PeerTls>, client: Option<PeerTls>) -> Vec<u8> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let timeout = std::time::Duration::from_secs(10);
        match accept_peer(server.as_ref(), tcp, timeout).await.unwrap() {
            Accepted::Stream(s) => {
                let (mut rd, mut wr) = s.into_split();
                let mut buf = [0u8; 5];
                rd.read_exact(&mut buf).await.unwrap();
                buf.make_ascii_uppercase();
                wr.write_all(&buf).await.unwrap();
                wr.flush().await.unwrap();
                wr.shutdown().await.unwrap();
            }
            Accepted::PlainRefused(mut tcp) => {
                let mut buf = [0u8; 5];
                tcp.read_exact(&mut buf).await.unwrap();
                tcp.write_all(b"REFUSED").await.unwrap();
            }
            Accepted::Closed => {}
        }
    });
    let tcp = TcpStream::connect(&addr).await.unwrap();
    let stream = connect_peer(client.as_ref(), &addr, tcp).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    assert!(matches!(
        (&rd, &wr, client.is_some()),
        (PeerReader::Plain(_), PeerWriter::Plain(_), false)
            | (PeerReader::Tls(_), PeerWriter::Tls(_), true)
    ));
    // Reader and writer in separate tasks, as the OSD and MDS clients run them.
    let writer = tokio::spawn(async move {
        wr.write_all(b"hello").await.unwrap();
        wr.flush().await.unwrap();
        wr
    });
    let mut got = Vec::new();
    rd.read_to_end(&mut got).await.unwrap();
    drop(writer.await.unwrap());
    srv.await.unwrap();
    got
}

#[tokio::test]
async fn split_halves_carry_data_and_a_plain_client_of_a_tls_server_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let tls = PeerTls::load(&pki(dir.path(), "cluster")).unwrap();
    assert_eq!(split_exchange(None, None).await, b"HELLO");
    assert_eq!(
        split_exchange(Some(tls.clone()), Some(tls.clone())).await,
        b"HELLO"
    );
    assert_eq!(split_exchange(Some(tls), None).await, b"REFUSED");
}

#[test]
fn frame_reservations_follow_the_bytes_that_arrived() {
    let mut buf = bytes::BytesMut::new();
    buf.extend_from_slice(&[0u8; 24]);
    // A header declaring 64 MiB reserves one step, not 64 MiB.
    reserve_frame(&mut buf, 64 << 20);
    assert!(
        buf.capacity() >= 24 + FRAME_RESERVE_STEP,
        "{}",
        buf.capacity()
    );
    assert!(
        buf.capacity() < 4 * FRAME_RESERVE_STEP,
        "{}",
        buf.capacity()
    );
    // A small frame reserves what it lacks.
    let mut small = bytes::BytesMut::new();
    small.extend_from_slice(&[0u8; 24]);
    reserve_frame(&mut small, 100);
    assert!(small.capacity() >= 100);
    // Nothing missing: nothing reserved.
    let cap = small.capacity();
    reserve_frame(&mut small, 10);
    assert_eq!(small.capacity(), cap);
}
