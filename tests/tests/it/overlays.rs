//! The cloud overlays in `manifests/overlays/{eks,gke}`: each rendered with `kubectl kustomize`,
//! validated strictly against the Kubernetes API schemas, its ConfigMap config checked by the
//! real agent binary (alone and with the DaemonSet's env, as the pod runs it), its disk selection
//! tried on the disks each cloud really has, and its scheduling rules asserted.
//!
//! Same tools and skip rules as `manifests.rs` (kubectl, Python with PyYAML, kubernetes-validate).

use std::collections::BTreeMap;

use nodekeeper::disks::discover::select;
use nodekeeper::disks::{Disk, DisksConfig};
use nodekeeper_tests::kustomize::{
    assert_strictly_valid, check_config, have_tools, render, yaml_documents,
};
use serde_json::{Value, json};

/// As in manifests.rs: the oldest Kubernetes release the manifests are checked against.
const NAMESPACE: &str = "nodekeeper-system";
const OVERLAYS: [&str; 2] = ["eks", "gke"];
const SAMPLE_NODE_NAME: &str = "ip-10-0-0-1.ec2.internal";

struct Rendered {
    name: String,
    objects: Vec<Value>,
}

fn rendered(overlay: &str) -> Rendered {
    Rendered {
        name: overlay.to_string(),
        objects: yaml_documents(&render(&format!("manifests/overlays/{overlay}"))),
    }
}

impl Rendered {
    fn kinds(&self) -> Vec<(String, String)> {
        let mut k: Vec<(String, String)> = self
            .objects
            .iter()
            .map(|o| {
                let name = o["metadata"]["name"].as_str().unwrap_or("").to_string();
                // The generated ConfigMap's hash differs per overlay; compare without it.
                let name = match name.strip_prefix("nodekeeper-config-") {
                    Some(_) => "nodekeeper-config-<hash>".into(),
                    None => name,
                };
                (o["kind"].as_str().unwrap_or("").to_string(), name)
            })
            .collect();
        k.sort();
        k
    }

    fn daemonset(&self) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == "DaemonSet" && o["metadata"]["name"] == "nodekeeper")
            .unwrap_or_else(|| panic!("{}: no DaemonSet nodekeeper", self.name))
    }

    fn pod_spec(&self) -> &Value {
        &self.daemonset()["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        self.pod_spec()["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .find(|c| c["name"] == "nodekeeper")
            .expect("container nodekeeper")
    }

    fn config_map(&self) -> &Value {
        let maps: Vec<&Value> = self
            .objects
            .iter()
            .filter(|o| o["kind"] == "ConfigMap")
            .collect();
        assert_eq!(maps.len(), 1, "{}: expected one ConfigMap", self.name);
        maps[0]
    }

    fn config_yaml(&self) -> &str {
        self.config_map()["data"]["config.yaml"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: ConfigMap has no config.yaml", self.name))
    }

    fn plain_env(&self) -> BTreeMap<String, String> {
        self.container()["env"]
            .as_array()
            .expect("env")
            .iter()
            .filter_map(|e| Some((e["name"].as_str()?.into(), e["value"].as_str()?.into())))
            .collect()
    }
}

/// The config the overlay's pod runs with (file + the DaemonSet's env), as check-config prints
/// it; fails the test when the agent rejects it.
fn effective_config(r: &Rendered) -> Value {
    let bare = check_config(r.config_yaml(), &BTreeMap::new());
    assert!(
        bare.status.success(),
        "{}: check-config rejected the ConfigMap's config.yaml ({}):\n{}\n---\n{}",
        r.name,
        bare.status,
        String::from_utf8_lossy(&bare.stderr),
        r.config_yaml()
    );
    let mut env = r.plain_env();
    env.insert("NODE_NAME".into(), SAMPLE_NODE_NAME.into());
    let o = check_config(r.config_yaml(), &env);
    assert!(
        o.status.success(),
        "{}: check-config with the pod's env failed ({}):\n{}",
        r.name,
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let mut docs = yaml_documents(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(docs.len(), 1);
    docs.remove(0)
}

fn disks_config(effective: &Value) -> DisksConfig {
    serde_json::from_value(effective["disks"].clone()).expect("disks section deserializes")
}

/// A whole, unused disk as discovery reports it.
fn disk(name: &str, model: &str, by_id: &str) -> Disk {
    let link = format!("/dev/disk/by-id/{by_id}");
    Disk {
        name: name.into(),
        model: model.into(),
        by_id: Some(link.clone()),
        by_id_links: vec![link],
        size_bytes: 375 << 30,
        ..Disk::default()
    }
}

fn selected(cfg: &DisksConfig, d: &Disk) -> bool {
    select(cfg, d).is_ok()
}

// === tests ===

#[test]
fn overlays_pass_strict_schema_validation() {
    if !have_tools(&["kubernetes-validate"]) {
        return;
    }
    for overlay in OVERLAYS {
        assert_strictly_valid(
            &format!("overlay {overlay}"),
            &render(&format!("manifests/overlays/{overlay}")),
        );
    }
}

#[test]
fn overlays_keep_the_base_objects_and_mount_their_own_config() {
    if !have_tools(&[]) {
        return;
    }
    let base = Rendered {
        name: "base".into(),
        objects: yaml_documents(&render("manifests/base")),
    };
    for overlay in OVERLAYS {
        let r = rendered(overlay);
        assert_eq!(
            r.kinds(),
            base.kinds(),
            "{overlay}: same objects as the base"
        );
        for o in &r.objects {
            if !matches!(
                o["kind"].as_str(),
                Some("Namespace" | "ClusterRole" | "ClusterRoleBinding" | "StorageClass")
            ) {
                assert_eq!(o["metadata"]["namespace"], NAMESPACE, "{overlay}: {o}");
            }
        }
        let cm = r.config_map()["metadata"]["name"].clone();
        assert_ne!(
            cm,
            base.config_map()["metadata"]["name"],
            "{overlay}: replaces the base's config"
        );
        let volume = r.pod_spec()["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "config")
            .expect("config volume");
        assert_eq!(
            volume["configMap"]["name"], cm,
            "{overlay}: the DaemonSet mounts the overlay's (hashed) ConfigMap"
        );
        // Everything the base sets on the pod that the overlay does not mean to change.
        for key in [
            "hostNetwork",
            "hostPID",
            "dnsPolicy",
            "priorityClassName",
            "tolerations",
        ] {
            assert_eq!(r.pod_spec()[key], base.pod_spec()[key], "{overlay}: {key}");
        }
        assert_eq!(r.container()["image"], base.container()["image"]);
        assert_eq!(r.container()["args"], base.container()["args"]);
    }
}

#[test]
fn overlay_configs_pass_check_config_and_keep_the_base_listens() {
    if !have_tools(&[]) {
        return;
    }
    let base = Rendered {
        name: "base".into(),
        objects: yaml_documents(&render("manifests/base")),
    };
    let base_effective = effective_config(&base);
    for overlay in OVERLAYS {
        let r = rendered(overlay);
        let effective = effective_config(&r);
        for key in ["stateDir", "hostPaths", "kubernetes", "api", "metrics"] {
            assert_eq!(
                effective[key], base_effective[key],
                "{overlay}: {key} as in the base (ports, probes and mounts depend on it)"
            );
        }
        let disks = &effective["disks"];
        assert_eq!(disks["enabled"], true, "{overlay}: disks on");
        assert_eq!(
            disks["hostMountNamespace"], true,
            "{overlay}: mounts visible to the kubelet"
        );
        assert_eq!(disks["mode"], "filesystem");
    }
}

#[test]
fn eks_selects_instance_store_and_never_ebs() {
    if !have_tools(&[]) {
        return;
    }
    let effective = effective_config(&rendered("eks"));
    let cfg = disks_config(&effective);
    assert_eq!(
        effective["disks"]["discoveryDir"],
        "/mnt/nodekeeper/instance-store"
    );
    let store = disk(
        "nvme1n1",
        "Amazon EC2 NVMe Instance Storage",
        "nvme-Amazon_EC2_NVMe_Instance_Storage_AWS1A2B3C4D5E6F7G8",
    );
    assert!(selected(&cfg, &store), "{:?}", select(&cfg, &store));
    // Model unreadable (AMI quirk): the by-id link still selects it.
    let by_link = Disk {
        model: String::new(),
        ..store.clone()
    };
    assert!(selected(&cfg, &by_link), "{:?}", select(&cfg, &by_link));
    let ebs = disk(
        "nvme0n1",
        "Amazon Elastic Block Store",
        "nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0",
    );
    assert!(!selected(&cfg, &ebs), "EBS is never a candidate");
}

#[test]
fn eks_turns_on_imds_notices_when_the_agent_has_them() {
    if !have_tools(&[]) {
        return;
    }
    let effective = effective_config(&rendered("eks"));
    if effective["drain"].get("imds").is_some() {
        assert_eq!(
            effective["drain"]["imds"]["enabled"], true,
            "EKS nodes watch IMDS for spot interruption and maintenance notices"
        );
    }
    let gke = effective_config(&rendered("gke"));
    if let Some(imds) = gke["drain"].get("imds") {
        assert_eq!(imds["enabled"], false, "GCE has no EC2 IMDS");
    }
}

#[test]
fn gke_selects_local_nvme_ssd_and_never_persistent_disks() {
    if !have_tools(&[]) {
        return;
    }
    let effective = effective_config(&rendered("gke"));
    let cfg = disks_config(&effective);
    assert_eq!(effective["disks"]["discoveryDir"], "/mnt/disks/nodekeeper");
    let ssd = disk("nvme1n1", "nvme_card", "google-local-nvme-ssd-0");
    assert!(selected(&cfg, &ssd), "{:?}", select(&cfg, &ssd));
    let by_link = Disk {
        model: "nvme_card-ssd".into(),
        ..ssd.clone()
    };
    assert!(selected(&cfg, &by_link), "{:?}", select(&cfg, &by_link));
    let pd = disk("nvme0n2", "nvme_card-pd", "google-data-disk");
    assert!(
        !selected(&cfg, &pd),
        "an NVMe persistent disk is never a candidate"
    );
    let scsi_pd = disk("sdb", "PersistentDisk", "google-persistent-disk-1");
    assert!(!selected(&cfg, &scsi_pd));
}

#[test]
fn eks_keeps_the_agent_off_fargate_and_gke_on_linux() {
    if !have_tools(&[]) {
        return;
    }
    let eks = rendered("eks");
    assert_eq!(
        eks.pod_spec()["nodeSelector"],
        json!({ "kubernetes.io/os": "linux" })
    );
    assert_eq!(
        eks.pod_spec()["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"],
        json!([{ "matchExpressions": [{
            "key": "eks.amazonaws.com/compute-type",
            "operator": "NotIn",
            "values": ["fargate", "hybrid"],
        }]}])
    );
    let gke = rendered("gke");
    assert_eq!(
        gke.pod_spec()["nodeSelector"],
        json!({ "kubernetes.io/os": "linux" })
    );
    assert!(gke.pod_spec().get("affinity").is_none());
}

/// Issue #19: the disks capability these overlays enable opens raw block devices (behind the
/// device cgroup of any unprivileged container) and mounts in the host's mount namespace, so
/// the agent is privileged here, and only here; the API would refuse the base's
/// allowPrivilegeEscalation: false next to privileged. The guard stays as in the base.
#[test]
fn overlays_with_disks_make_only_the_agent_privileged() {
    if !have_tools(&[]) {
        return;
    }
    for overlay in OVERLAYS {
        let r = rendered(overlay);
        let effective = effective_config(&r);
        assert_eq!(effective["disks"]["enabled"], true, "{overlay}");
        let sc = &r.container()["securityContext"];
        assert_eq!(sc["privileged"], true, "{overlay}: {sc}");
        assert!(
            sc.get("allowPrivilegeEscalation").is_none(),
            "{overlay}: the API refuses privileged with allowPrivilegeEscalation: {sc}"
        );
        assert!(
            sc.get("capabilities").is_none(),
            "{overlay}: privileged grants every capability; a list would mislead: {sc}"
        );
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{overlay}");
        let guard = r.pod_spec()["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .find(|c| c["name"] == "dns-guard")
            .expect("dns-guard");
        assert_eq!(guard["securityContext"]["privileged"], false, "{overlay}");
        assert_eq!(
            guard["securityContext"]["capabilities"]["drop"],
            json!(["ALL"]),
            "{overlay}"
        );
    }
}
