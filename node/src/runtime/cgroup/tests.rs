use super::*;
use crate::runtime::MIB;

#[test]
fn cgroup_mounts_and_layouts() {
    let hybrid = "\
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
32 30 0:28 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
";
    let mounts = parse_cgroup_mounts(hybrid);
    assert_eq!(mounts.len(), 4);
    assert_eq!(mounts[2].controllers, vec!["cpu", "cpuacct"]);
    assert!(
        mounts[3].controllers.is_empty(),
        "name=systemd is not a controller"
    );
    let with_hugetlb = CgroupLayout::from_mounts(&mounts, |_| "hugetlb\n".into()).expect("layout");
    assert_eq!(
        with_hugetlb,
        CgroupLayout::V1 {
            memory: "/sys/fs/cgroup/memory".into(),
            cpu: "/sys/fs/cgroup/cpu,cpuacct".into(),
            cpuacct: "/sys/fs/cgroup/cpu,cpuacct".into(),
            hide_unified: Some("/sys/fs/cgroup/unified".into()),
        }
    );
    let empty_unified = CgroupLayout::from_mounts(&mounts, |_| "\n".into()).expect("layout");
    assert!(matches!(
        empty_unified,
        CgroupLayout::V1 {
            hide_unified: None,
            ..
        }
    ));
    let cg1 = with_hugetlb.cgroup(&CgroupLayout::child("/surge-vm/", "surge-vm-42-7"));
    assert_eq!(
        cg1.memory,
        Path::new("/sys/fs/cgroup/memory/surge-vm/surge-vm-42-7")
    );
    assert_eq!(cg1.dirs().len(), 2, "cpu and cpuacct share a hierarchy");
    assert!(!cg1.v2);

    let v2 = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
    let layout = CgroupLayout::from_mounts(&parse_cgroup_mounts(v2), |_| "cpu memory pids".into())
        .expect("v2");
    assert_eq!(
        layout,
        CgroupLayout::V2 {
            root: "/sys/fs/cgroup".into()
        }
    );
    let cg2 = layout.cgroup("/surge/x/");
    assert_eq!(cg2.dirs(), vec![Path::new("/sys/fs/cgroup/surge/x")]);
    assert!(cg2.v2);
    assert!(CgroupLayout::from_mounts(&[], |_| String::new()).is_err());
}

#[test]
fn cgroup_file_parsing() {
    assert_eq!(
        parse_keyed("low 0\nhigh 2\nmax 5\noom 1\noom_kill 1\n", "oom_kill"),
        Some(1)
    );
    assert_eq!(
        parse_keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n", "oom_kill"),
        Some(3)
    );
    assert_eq!(
        parse_keyed("total_inactive_file 4096\n", "inactive_file"),
        None
    );
    assert_eq!(parse_limit("max\n"), None);
    assert_eq!(
        parse_limit("9223372036854771712\n"),
        None,
        "v1's 'unlimited'"
    );
    assert_eq!(parse_limit("67108864\n"), Some(64 * MIB));
    assert_eq!((cpu_quota_us(1500), cpu_shares(1500)), (150_000, 1536));
    assert_eq!((cpu_quota_us(1), cpu_shares(1)), (1000, 2));
}

/// Usage and OOM evidence read from files laid out as the kernel lays them out (v2 and v1).
#[test]
fn usage_and_oom_evidence_from_cgroup_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let v2 = Cgroup {
        memory: dir.path().join("v2"),
        cpu: dir.path().join("v2"),
        cpuacct: dir.path().join("v2"),
        v2: true,
    };
    assert_eq!(v2.usage(), None, "no cgroup, no usage");
    std::fs::create_dir_all(&v2.memory).expect("mkdir");
    let write = |p: &Path, f: &str, t: &str| std::fs::write(p.join(f), t).expect("write");
    write(&v2.memory, "memory.current", "1000000\n");
    write(&v2.memory, "memory.stat", "anon 1\ninactive_file 400000\n");
    write(&v2.memory, "memory.max", "max\n");
    write(&v2.cpu, "cpu.stat", "usage_usec 7\nuser_usec 5\n");
    write(&v2.memory, "memory.events", "oom 0\noom_kill 0\n");
    assert_eq!(
        v2.usage(),
        Some(CgroupUsage {
            working_set_bytes: 600_000,
            limit_bytes: None,
            cpu_usage_ns: 7000
        })
    );
    assert!(!v2.oom_killed());
    write(&v2.memory, "memory.events", "oom 1\noom_kill 1\n");
    assert!(v2.oom_killed());

    let v1 = Cgroup {
        memory: dir.path().join("memory"),
        cpu: dir.path().join("cpu"),
        cpuacct: dir.path().join("cpu"),
        v2: false,
    };
    std::fs::create_dir_all(&v1.memory).expect("mkdir");
    std::fs::create_dir_all(&v1.cpu).expect("mkdir");
    write(&v1.memory, "memory.usage_in_bytes", "5000\n");
    write(
        &v1.memory,
        "memory.stat",
        "inactive_file 9\ntotal_inactive_file 1000\n",
    );
    write(&v1.memory, "memory.limit_in_bytes", "67108864\n");
    write(&v1.cpuacct, "cpuacct.usage", "123\n");
    write(
        &v1.memory,
        "memory.oom_control",
        "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
    );
    assert_eq!(
        v1.usage(),
        Some(CgroupUsage {
            working_set_bytes: 4000,
            limit_bytes: Some(64 * MIB),
            cpu_usage_ns: 123
        })
    );
    assert!(v1.oom_killed());
    v1.remove();
    assert!(
        v1.memory.exists(),
        "a cgroup with files stays (rmdir, not rm -r)"
    );
}
