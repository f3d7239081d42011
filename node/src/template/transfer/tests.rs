use super::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("surge-transfer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A small root filesystem installed as template `src` under `dir/a`.
fn source(dir: &Path) -> Templates {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).expect("bin");
    std::fs::create_dir_all(root.join("work/deep/er")).expect("work");
    std::fs::write(root.join("bin/tool"), b"#!/bin/sh\necho hi\n").expect("tool");
    std::fs::write(root.join("work/deep/er/data"), vec![7u8; 300_000]).expect("data");
    std::os::unix::fs::symlink("tool", root.join("bin/alias")).expect("symlink");
    let t = Templates::new(&dir.join("a"));
    t.import_dir("src", &root).expect("import the source");
    t
}

fn exported(t: &Templates) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let digest = export(t, "src", |b| {
        pieces.push(Piece::Data(b));
        true
    })
    .expect("export");
    pieces.push(digest);
    pieces
}

/// Nothing under the templates root but the names given (no staging directory left).
fn entries(t: &Templates) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(t.root()) {
        Ok(rd) => rd
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

#[test]
fn a_copy_arrives_whole_with_its_digest() {
    let dir = scratch("whole");
    let a = source(&dir);
    let pieces = exported(&a);
    let b = Templates::new(&dir.join("b"));
    let got = receive(&b, "copy", pieces.clone().into_iter().map(Ok)).expect("receive");
    let Some(Piece::Digest { sha256, bytes }) = pieces.last().cloned() else {
        panic!("the last piece is the digest");
    };
    assert_eq!((got.sha256, got.bytes), (sha256, bytes));
    let copy = b.path("copy").expect("installed");
    assert_eq!(
        std::fs::read(copy.join("work/deep/er/data")).expect("data"),
        vec![7u8; 300_000]
    );
    assert_eq!(
        std::fs::read_link(copy.join("bin/alias")).expect("link"),
        PathBuf::from("tool")
    );
    assert_eq!(entries(&b), vec!["copy".to_owned()]);
    // The same name again is refused, and leaves nothing new.
    let again = receive(&b, "copy", pieces.into_iter().map(Ok));
    assert!(
        matches!(again, Err(TemplateError::Exists { .. })),
        "{again:?}"
    );
    assert_eq!(entries(&b), vec!["copy".to_owned()]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_damaged_copy_fails_and_leaves_nothing() {
    let dir = scratch("damaged");
    let a = source(&dir);
    let mut pieces = exported(&a);
    // Flip one byte of file content (past the first headers).
    let Piece::Data(first) = &pieces[0] else {
        panic!("data first");
    };
    let mut bad = first.to_vec();
    let at = bad.len() / 2;
    bad[at] ^= 0xff;
    pieces[0] = Piece::Data(Bytes::from(bad));
    let b = Templates::new(&dir.join("b"));
    let got = receive(&b, "copy", pieces.into_iter().map(Ok));
    assert!(matches!(got, Err(TemplateError::Damaged { .. })), "{got:?}");
    assert!(b.path("copy").is_err());
    assert_eq!(entries(&b), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_truncated_or_failed_copy_leaves_nothing() {
    let dir = scratch("truncated");
    let a = source(&dir);
    let pieces = exported(&a);
    let b = Templates::new(&dir.join("b"));
    // The digest never came (the connection broke after the data).
    let data: Vec<Piece> = pieces[..pieces.len() - 1].to_vec();
    let got = receive(&b, "copy", data.into_iter().map(Ok));
    assert!(matches!(got, Err(TemplateError::Damaged { .. })), "{got:?}");
    assert_eq!(entries(&b), Vec::<String>::new());
    // The source failed midway: its error is the copy's.
    let failing = vec![
        Ok(pieces[0].clone()),
        Err(TemplateError::Damaged {
            name: "src".into(),
            why: "the source went away".into(),
        }),
    ];
    let got = receive(&b, "copy", failing.into_iter());
    assert!(
        matches!(&got, Err(TemplateError::Damaged { why, .. }) if why.contains("went away")),
        "{got:?}"
    );
    assert_eq!(entries(&b), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tar stream with one member named `name` (written into the header raw, as a hostile
/// source could).
fn hostile_stream(name: &[u8]) -> Vec<Piece> {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_size(3);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut bytes = header.as_bytes().to_vec();
    bytes.extend_from_slice(b"bad");
    bytes.resize(bytes.len() + 509, 0);
    bytes.extend_from_slice(&[0u8; 1024]);
    let sha256: [u8; 32] = Sha256::digest(&bytes).into();
    let len = bytes.len() as u64;
    vec![
        Piece::Data(Bytes::from(bytes)),
        Piece::Digest { sha256, bytes: len },
    ]
}

#[test]
fn members_outside_the_template_are_refused() {
    let dir = scratch("hostile");
    let b = Templates::new(&dir.join("b"));
    let got = receive(&b, "copy", hostile_stream(b"../evil").into_iter().map(Ok));
    assert!(got.is_err(), "{got:?}");
    assert!(!dir.join("evil").exists() && !dir.join("b/evil").exists());
    assert_eq!(entries(&b), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stream_that_is_no_root_filesystem_is_refused() {
    let dir = scratch("notroot");
    let b = Templates::new(&dir.join("b"));
    let got = receive(
        &b,
        "copy",
        hostile_stream(b"just-a-file").into_iter().map(Ok),
    );
    assert!(
        matches!(got, Err(TemplateError::NotARootfs { .. })),
        "{got:?}"
    );
    assert_eq!(entries(&b), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn names_are_checked_before_anything_is_read() {
    let dir = scratch("names");
    let b = Templates::new(&dir.join("b"));
    let got = receive(&b, "../x", std::iter::empty());
    assert!(
        matches!(got, Err(TemplateError::InvalidName { .. })),
        "{got:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
