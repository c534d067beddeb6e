//! What this host's QEMU and KVM can do, asked of a throw-away QEMU with
//! no guest (`-machine none`, as libvirt's capability probe does): its
//! version, migration capabilities, machine types and CPU models with
//! what KVM cannot provide of each. Admission uses it before a VM exists
//! here, e.g. on a migration target: "can this host run CPU model X,
//! machine type Y, with capabilities Z?"

use std::ffi::OsString;

use super::args::QemuPaths;
use super::commands::{
    CpuDefinition, CpuModelExpansionType, CpuModelInfo, CpuModelSupport, MachineInfo,
    MigrationCapability,
};
use super::process::{LaunchError, QemuLauncher};
use super::qmp::{QemuVersion, QmpError};

/// The host's answers, gathered once (they change only with a QEMU or
/// kernel update).
#[derive(Clone, Debug, PartialEq)]
pub struct HostProbe {
    pub version: QemuVersion,
    pub package: String,
    pub migration_capabilities: Vec<MigrationCapability>,
    pub machines: Vec<MachineInfo>,
    pub cpu_models: Vec<CpuDefinition>,
    /// `host` expanded to a static model: what `-cpu host` gives a guest
    /// here, comparable with another host's.
    pub host_cpu: CpuModelInfo,
}

/// Probing failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot start the probe qemu")]
    Launch(#[source] LaunchError),
    #[error("the probe qemu did not answer")]
    Qmp(#[source] QmpError),
}

impl QemuLauncher {
    /// Starts a guest-less QEMU in `paths.dir`, asks it, and ends it.
    pub async fn probe_host(&self, paths: &QemuPaths) -> Result<HostProbe, ProbeError> {
        let mut args: Vec<OsString> = Vec::new();
        let mut arg = |flag: &str, value: OsString| {
            args.push(flag.into());
            args.push(value);
        };
        arg("-machine", "none".into());
        arg("-accel", "kvm".into());
        arg("-display", "none".into());
        arg("-pidfile", paths.pidfile.clone().into());
        arg("-D", paths.qemu_log.clone().into());
        let mut chardev = OsString::from("socket,id=qmp,path=");
        chardev.push(super::args::opts_path(&paths.qmp_socket));
        chardev.push(",server=on,wait=off");
        arg("-chardev", chardev);
        arg("-mon", "chardev=qmp,mode=control".into());
        args.extend(["-nodefaults", "-no-user-config", "-daemonize"].map(OsString::from));

        let qemu = self
            .spawn_daemonized(&args, paths)
            .await
            .map_err(ProbeError::Launch)?;
        let answers = ask(&qemu.qmp).await;
        // The probe has served its purpose either way.
        if let Err(e) = self.stop(&qemu).await {
            tracing::warn!(error = %e, "probe qemu did not stop");
        }
        answers.map_err(ProbeError::Qmp)
    }
}

async fn ask(qmp: &super::qmp::QmpClient) -> Result<HostProbe, QmpError> {
    let greeting = qmp.greeting();
    let host = CpuModelInfo {
        name: "host".into(),
        ..CpuModelInfo::default()
    };
    Ok(HostProbe {
        version: greeting.version.clone(),
        package: greeting.package.clone(),
        migration_capabilities: qmp
            .query_migrate_capabilities()
            .await?
            .into_iter()
            .map(|c| c.capability)
            .collect(),
        machines: qmp.query_machines().await?,
        cpu_models: qmp.query_cpu_definitions().await?,
        host_cpu: qmp
            .query_cpu_model_expansion(CpuModelExpansionType::Static, &host)
            .await?,
    })
}

impl HostProbe {
    /// Whether CPU model `name` runs here (see
    /// [`QmpClient::cpu_model_support`](super::qmp::QmpClient::cpu_model_support)).
    pub fn cpu_model_support(&self, name: &str) -> CpuModelSupport {
        super::commands::support_from_definitions(&self.cpu_models, name)
    }

    /// The versioned machine type `name` stands for, if this QEMU has it.
    pub fn resolve_machine(&self, name: &str) -> Option<&str> {
        super::commands::resolve_machine_in(&self.machines, name)
    }

    pub fn has_capability(&self, capability: &MigrationCapability) -> bool {
        self.migration_capabilities.contains(capability)
    }

    /// Features a guest started with `-cpu host` on the host described by
    /// `source` has and this host cannot give it: a `host`-model guest
    /// may only move here when this is empty.
    pub fn missing_host_features(&self, source: &CpuModelInfo) -> Vec<String> {
        missing_features(source, &self.host_cpu)
    }
}

/// Boolean features `required` has on and `offered` lacks, sorted. Both
/// must be static expansions (same base model) to be comparable.
pub fn missing_features(required: &CpuModelInfo, offered: &CpuModelInfo) -> Vec<String> {
    let mut missing: Vec<String> = required
        .enabled_features()
        .filter(|f| offered.feature(f) != Some(true))
        .map(str::to_owned)
        .collect();
    missing.sort();
    missing
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn model(props: serde_json::Value) -> CpuModelInfo {
        serde_json::from_value(json!({"name": "base", "props": props})).unwrap()
    }

    #[test]
    fn missing_features_are_those_on_one_side_only() {
        let source = model(json!({"avx512f": true, "sse4.2": true, "pku": false, "family": 6}));
        let same = model(json!({"avx512f": true, "sse4.2": true, "pku": true}));
        let older = model(json!({"avx512f": false, "sse4.2": true}));
        assert!(missing_features(&source, &same).is_empty());
        assert_eq!(missing_features(&source, &older), ["avx512f"]);
        // Absent from the offer counts as missing.
        assert_eq!(
            missing_features(&source, &model(json!({}))),
            ["avx512f", "sse4.2"]
        );
    }
}
