use super::*;

mod archives;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("surge-template-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn names_are_validated() {
    for ok in ["busybox", "python-3.12", "a", "ubuntu_24.04"] {
        assert!(validate_name(ok).is_ok(), "{ok}");
    }
    let long = "x".repeat(TEMPLATE_NAME_MAX + 1);
    for bad in [
        "",
        "..",
        ".",
        ".hidden",
        "a/b",
        "../etc",
        "a b",
        "a,b",
        "a:b",
        long.as_str(),
    ] {
        assert!(validate_name(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn imports_fail_with_reasons() {
    let data = scratch("bad-imports");
    let templates = Templates::new(&data);
    let missing = data.join("nope");
    let e = templates.import("x", &missing).expect_err("missing path");
    assert!(matches!(e, TemplateError::SourceMissing { .. }), "{e}");
    assert!(matches!(
        templates.import("bad/name", &data),
        Err(TemplateError::InvalidName { .. })
    ));
    // a directory holding one wrapping directory is not a root filesystem
    let wrapped = data.join("wrapped");
    std::fs::create_dir_all(wrapped.join("rootfs/bin")).expect("mkdir");
    let e = templates.import("wrapped", &wrapped).expect_err("wrapped");
    assert!(
        matches!(e, TemplateError::NotARootfs { .. }) && e.to_string().contains("rootfs"),
        "{e}"
    );
    assert!(
        templates.list().expect("list").is_empty(),
        "nothing half-made is listed"
    );
    // real archives that escape: an absolute member and a `..` member (tar -P keeps them)
    let victim = data.join("victim");
    std::fs::write(&victim, "host file").expect("write");
    let abs = data.join("abs.tar");
    run(Command::new("tar")
        .arg("-P")
        .arg("-cf")
        .arg(&abs)
        .arg(&victim))
    .expect("tar -P");
    let e = templates.import("abs", &abs).expect_err("absolute member");
    assert!(matches!(e, TemplateError::Escapes { .. }), "{e}");
    let dotdot = data.join("dotdot.tar");
    run(Command::new("tar")
        .arg("-P")
        .arg("-cf")
        .arg(&dotdot)
        .arg("-C")
        .arg(&wrapped)
        .arg("../victim"))
    .expect("tar ..");
    let e = templates
        .import("dotdot", &dotdot)
        .expect_err("dotdot member");
    assert!(matches!(e, TemplateError::Escapes { .. }), "{e}");
    assert_eq!(std::fs::read_to_string(&victim).expect("read"), "host file");
    assert!(templates.list().expect("list").is_empty());
    std::fs::remove_dir_all(&data).expect("cleanup");
}

#[test]
fn applet_list_parsing_drops_junk() {
    assert_eq!(
        parse_applet_list("sh\n\n sleep \n../x\n.\necho\n"),
        vec!["sh", "sleep", "echo"]
    );
}

#[test]
fn busybox_template_then_import_and_list() {
    if !Path::new(HOST_BUSYBOX).is_file() {
        crate::testing::unavailable(&format!(
            "{HOST_BUSYBOX} missing; apt-get install -y busybox-static"
        ));
        return;
    }
    let data = scratch("bb");
    let templates = Templates::new(&data);
    let bb = templates.ensure_busybox().expect("busybox template");
    assert_eq!(templates.ensure_busybox().expect("idempotent"), bb);
    for applet in ["sh", "sleep", "echo", "cat", "yes", "head", "dd"] {
        let link = bb.join("bin").join(applet);
        assert_eq!(
            std::fs::read_link(&link).expect("applet link"),
            Path::new("busybox"),
            "{applet}"
        );
    }
    let out = Command::new(bb.join("bin/sh"))
        .args(["-c", "echo ok"])
        .output()
        .expect("run template sh");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");

    templates.import_dir("copy", &bb).expect("import dir");
    assert!(matches!(
        templates.import_dir("copy", &bb),
        Err(TemplateError::Exists { .. })
    ));
    let tarball = data.join("bb.tar");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&tarball)
        .arg("-C")
        .arg(&bb)
        .arg("."))
    .expect("tar");
    templates
        .import_tarball("from-tar", &tarball)
        .expect("import tarball");
    assert!(templates
        .path("from-tar")
        .expect("path")
        .join("bin/busybox")
        .is_file());
    assert!(templates
        .import_tarball("broken", &data.join("missing.tar"))
        .is_err());
    assert_eq!(
        templates.list().expect("list"),
        vec!["busybox", "copy", "from-tar"]
    );
    assert!(matches!(
        templates.path("nope"),
        Err(TemplateError::NotFound { .. })
    ));
    std::fs::remove_dir_all(&data).expect("cleanup");
}
