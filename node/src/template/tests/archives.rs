//! Hostile archives, built here byte for byte with the `tar` crate (names are written into the
//! headers raw, so nothing on the way cleans them up), against the import's member checks.

use tar::{EntryType, Header};

use super::*;

/// One member: type, raw name, raw link target, content.
type Spec<'a> = (EntryType, &'a [u8], Option<&'a [u8]>, &'a [u8]);

fn header(kind: EntryType, name: &[u8], link: Option<&[u8]>, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    let old = h.as_old_mut();
    let n = name.len().min(old.name.len());
    old.name[..n].copy_from_slice(&name[..n]);
    if let Some(l) = link {
        old.linkname[..l.len()].copy_from_slice(l);
    }
    h.set_cksum();
    h
}

fn archive(members: &[Spec<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (kind, name, link, data) in members {
        let h = header(*kind, name, *link, data.len() as u64);
        b.append(&h, *data).expect("append");
    }
    b.into_inner().expect("finish the archive")
}

/// A pax record `LEN key=value\n`, LEN counting the whole record.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body_len = key.len() + value.len() + 3; // space, `=`, newline
    let mut len = body_len + 1;
    while len.to_string().len() + body_len != len {
        len = len.to_string().len() + body_len;
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).expect("write archive");
    p
}

fn gzip(path: &Path) -> PathBuf {
    let out = Command::new("gzip")
        .arg("-c")
        .arg(path)
        .output()
        .expect("gzip is part of every Debian");
    assert!(out.status.success());
    let gz = path.with_extension("tar.gz");
    std::fs::write(&gz, out.stdout).expect("write gz");
    gz
}

#[test]
fn hostile_archives_are_refused_before_unpacking() {
    let dir = tempfile::tempdir().expect("tmp");
    let long_abs = format!("/{}passwd", "a/".repeat(80)).into_bytes();
    let long_name = {
        let mut data = long_abs.clone();
        data.push(0);
        data
    };
    let pax_path = pax_record("path", b"/etc/passwd");
    let pax_link = pax_record("linkpath", b"../../etc/shadow");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "absolute",
            archive(&[(EntryType::Regular, b"/etc/passwd", None, b"x")]),
            "absolute",
        ),
        (
            "dotdot",
            archive(&[(EntryType::Regular, b"../outside", None, b"x")]),
            "`..`",
        ),
        (
            "nested-dotdot",
            archive(&[(EntryType::Regular, b"./a/../../outside", None, b"x")]),
            "`..`",
        ),
        (
            "through-symlink",
            archive(&[
                (EntryType::Symlink, b"./etc", Some(b"/etc"), b""),
                (EntryType::Regular, b"etc//passwd", None, b"x"),
            ]),
            "symlink",
        ),
        (
            "deep-through-symlink",
            archive(&[
                (EntryType::Directory, b"a/", None, b""),
                (EntryType::Symlink, b"a/b", Some(b"../../.."), b""),
                (EntryType::Regular, b"a/b/c/d", None, b"x"),
            ]),
            "symlink",
        ),
        (
            "hardlink-absolute",
            archive(&[(EntryType::Link, b"x", Some(b"/etc/shadow"), b"")]),
            "hard link to an absolute",
        ),
        (
            "hardlink-dotdot",
            archive(&[(EntryType::Link, b"x", Some(b"a/../../x"), b"")]),
            "hard link whose target contains",
        ),
        (
            "gnu-long-name",
            archive(&[
                (EntryType::GNULongName, b"././@LongLink", None, &long_name),
                (EntryType::Regular, b"innocent", None, b"x"),
            ]),
            "absolute",
        ),
        (
            "pax-path",
            archive(&[
                (EntryType::XHeader, b"PaxHeaders/innocent", None, &pax_path),
                (EntryType::Regular, b"innocent", None, b"x"),
            ]),
            "absolute",
        ),
        (
            "pax-linkpath",
            archive(&[
                (EntryType::XHeader, b"PaxHeaders/x", None, &pax_link),
                (EntryType::Link, b"x", Some(b"bin/sh"), b""),
            ]),
            "hard link whose target contains",
        ),
    ];
    for (name, bytes, why) in cases {
        let plain = write(dir.path(), &format!("{name}.tar"), &bytes);
        for file in [plain.clone(), gzip(&plain)] {
            match archive::check_archive(&file) {
                Err(e @ TemplateError::Escapes { .. }) => {
                    let text = e.to_string();
                    assert!(text.contains("escapes its root"), "{name}: {text}");
                    assert!(text.contains(why), "{name}: `{why}` not in {text}");
                }
                other => panic!("{name} ({}) was not refused: {other:?}", file.display()),
            }
        }
    }
}

#[test]
fn a_plain_rootfs_archive_passes_with_its_size() {
    let dir = tempfile::tempdir().expect("tmp");
    let busybox = vec![0u8; 1000];
    let global = pax_record("comment", b"made by a test");
    let bytes = archive(&[
        (
            EntryType::XGlobalHeader,
            b"pax_global_header",
            None,
            &global,
        ),
        (EntryType::Directory, b"./", None, b""),
        (EntryType::Directory, b"./bin/", None, b""),
        (EntryType::Regular, b"./bin/busybox", None, &busybox),
        // A symlink may point anywhere: it is resolved inside the sandbox.
        (EntryType::Symlink, b"./bin/sh", Some(b"/bin/busybox"), b""),
        (EntryType::Link, b"./bin/ash", Some(b"./bin/busybox"), b""),
        (EntryType::Char, b"./dev/null", None, b""),
        (
            EntryType::Regular,
            b"./etc/file with spaces",
            None,
            &[b'x'; 24],
        ),
        // What `tar --list` showed as a symlink line: only a name to the tar crate.
        (EntryType::Regular, b"./etc/a -> b", None, b""),
    ]);
    let plain = write(dir.path(), "root.tar", &bytes);
    for file in [plain.clone(), gzip(&plain)] {
        let size = archive::check_archive(&file).expect("a plain root filesystem passes");
        assert_eq!(
            size,
            TreeSize {
                bytes: 1024,
                entries: 8
            },
            "{}",
            file.display()
        );
    }
}

#[test]
fn archives_past_the_caps_are_refused_without_reading_them() {
    let dir = tempfile::tempdir().expect("tmp");
    // One header claiming more than a template may hold, and no content at all: the check
    // stops at the cap instead of reading 8 GiB.
    let mut bytes = header(EntryType::Regular, b"big", None, TEMPLATE_BYTES_MAX + 1)
        .as_bytes()
        .to_vec();
    bytes.extend_from_slice(&[0u8; 1024]);
    let file = write(dir.path(), "big.tar", &bytes);
    let size = archive::check_archive(&file).expect("counted");
    assert!(matches!(
        check_size(&file, size),
        Err(TemplateError::TooLarge { .. })
    ));
    // Entries: the pure check stops counting one past the cap.
    let many = (0..=TEMPLATE_ENTRIES_MAX).map(|i| {
        Ok(Member {
            kind: MemberKind::Dir,
            names: vec![format!("d{i}").into_bytes()],
            links: Vec::new(),
            size: 0,
        })
    });
    let size = check_members(&file, many).expect("counted");
    assert_eq!(size.entries, TEMPLATE_ENTRIES_MAX + 1);
    assert!(matches!(
        check_size(&file, size),
        Err(TemplateError::TooLarge { .. })
    ));
}

#[test]
fn garbage_is_not_an_archive() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = write(dir.path(), "junk.tar", &[0x42; 700]);
    assert!(archive::check_archive(&file).is_err());
    let gz = dir.path().join("junk.tar.gz");
    std::fs::write(&gz, b"\x1f\x8bnot really gzip").expect("write");
    assert!(archive::check_archive(&gz).is_err(), "a broken gzip stream");
}

/// The whole import: a symlink escape is refused and nothing lands outside (or inside).
#[test]
fn import_refuses_an_escape_and_writes_nothing() {
    let data = tempfile::tempdir().expect("tmp");
    let victim = data.path().join("victim");
    std::fs::create_dir(&victim).expect("victim dir");
    let link = victim.to_string_lossy().into_owned().into_bytes();
    let bytes = archive(&[
        (EntryType::Directory, b"bin/", None, b""),
        (EntryType::Symlink, b"evil", Some(&link), b""),
        (EntryType::Regular, b"evil/owned", None, b"pwned"),
    ]);
    let file = write(data.path(), "evil.tar", &bytes);
    let templates = Templates::new(data.path());
    let e = templates.import("evil", &file).expect_err("refused");
    assert!(matches!(e, TemplateError::Escapes { .. }), "{e}");
    assert_eq!(
        std::fs::read_dir(&victim).expect("victim").count(),
        0,
        "nothing written through the link"
    );
    assert!(templates.list().expect("list").is_empty());
}
