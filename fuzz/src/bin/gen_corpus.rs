//! Writes the seed corpora: `fuzz/corpus/TARGET/seed-N` for every target, from `seeds::all()`.
//! Run `cargo run --manifest-path fuzz/Cargo.toml --bin gen_corpus` after changing a format, and
//! commit the result (`fuzz/run-all.sh` fuzzes from the committed seeds).

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in vstor_fuzz::seeds::all() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
            {
                std::fs::remove_file(path)?;
            }
        }
        for (i, seed) in seeds.iter().enumerate() {
            // Every seed must pass its own target (no panic) before it is written.
            check(target, seed);
            std::fs::write(dir.join(format!("seed-{i}")), seed)?;
        }
        println!("{target}: {} seeds", seeds.len());
    }
    Ok(())
}

fn check(target: &str, seed: &[u8]) {
    match target {
        "nbd_handshake" => vstor_fuzz::nbd_handshake::check(seed),
        "nbd_request" => vstor_fuzz::nbd_request::check(seed),
        "vhost_request" => vstor_fuzz::vhost_request::check(seed),
        "dtl_codec" => vstor_fuzz::dtl_codec::check(seed),
        "mds_codec" => vstor_fuzz::mds_codec::check(seed),
        "osd_codec" => vstor_fuzz::osd_codec::check(seed),
        "edge_codec" => vstor_fuzz::edge_codec::check(seed),
        "tlog" => vstor_fuzz::tlog::check(seed),
        "sco_header" => vstor_fuzz::sco_header::check(seed),
        "meta_envelope" => vstor_fuzz::meta_envelope::check(seed),
        "snapshot_log" => vstor_fuzz::snapshot_log::check(seed),
        other => panic!("no check for target {other}"),
    }
}
