//! What a resource's `jobTemplate` may change about the runner's pod.
//!
//! Anyone allowed to create a DatabaseMigration has the operator create pods for them, so the
//! jobTemplate must not become a way around the Pod Security a namespace enforces, nor around
//! the RBAC that keeps them from creating pods themselves. Two rules:
//! - a `securityContext` override is merged into the restricted defaults field by field (setting
//!   `runAsUser` keeps the read-only root filesystem, `drop: [ALL]` and RuntimeDefault seccomp);
//! - the privileges below are refused, with the field that asks for one, unless the operator's
//!   configuration allows them (`dbshift controller --job-allow`, the Helm value
//!   `jobPolicy.allow`).
//!
//! hostPath and other volumes cannot be asked for at all: the jobTemplate has no volume field
//! (the CRD's structural schema prunes one), nor host PID/IPC.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use k8s_openapi::api::core::v1::{Capabilities, SeccompProfile, SecurityContext};

use crate::crd::JobTemplateSpec;

/// The unprivileged user of the runner image.
pub const RUNNER_UID: i64 = 65532;

/// A privilege a jobTemplate may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Privilege {
    /// `hostNetwork: true`.
    HostNetwork,
    /// `securityContext.privileged: true`.
    Privileged,
    /// `securityContext.capabilities.add`.
    AddCapabilities,
    /// `securityContext.allowPrivilegeEscalation: true`.
    PrivilegeEscalation,
    /// `securityContext.runAsUser: 0` or `runAsNonRoot: false`.
    RunAsRoot,
    /// `seccompProfile.type: Unconfined`, `appArmorProfile.type: Unconfined`, `procMount:
    /// Unmasked`, `seLinuxOptions`, `windowsOptions.hostProcess`.
    Unconfined,
}

impl Privilege {
    pub const ALL: [Privilege; 6] = [
        Privilege::HostNetwork,
        Privilege::Privileged,
        Privilege::AddCapabilities,
        Privilege::PrivilegeEscalation,
        Privilege::RunAsRoot,
        Privilege::Unconfined,
    ];

    /// The name `--job-allow` and `jobPolicy.allow` take.
    pub fn name(self) -> &'static str {
        match self {
            Privilege::HostNetwork => "hostNetwork",
            Privilege::Privileged => "privileged",
            Privilege::AddCapabilities => "addCapabilities",
            Privilege::PrivilegeEscalation => "privilegeEscalation",
            Privilege::RunAsRoot => "runAsRoot",
            Privilege::Unconfined => "unconfined",
        }
    }
}

impl fmt::Display for Privilege {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Privilege {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Privilege::ALL.into_iter().find(|p| p.name() == s.trim()).ok_or_else(|| {
            let names: Vec<&str> = Privilege::ALL.iter().map(|p| p.name()).collect();
            format!("unknown privilege {:?}: expected one of {}", s.trim(), names.join(", "))
        })
    }
}

/// The privileges this operator lets a jobTemplate ask for (none by default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobPolicy {
    pub allow: BTreeSet<Privilege>,
}

impl JobPolicy {
    /// From a comma-separated list (`--job-allow`, DBSHIFT_JOB_ALLOW); empty allows nothing.
    pub fn parse(list: &str) -> Result<JobPolicy, String> {
        let allow = list.split(',').filter(|s| !s.trim().is_empty()).map(str::parse).collect::<Result<_, _>>()?;
        Ok(JobPolicy { allow })
    }

    /// The first privilege the template asks for that is not allowed: the field, and why.
    pub fn check(&self, t: &JobTemplateSpec) -> Result<(), String> {
        for (field, p) in asked(t) {
            if !self.allow.contains(&p) {
                return Err(format!(
                    "spec.jobTemplate.{field} asks for a privilege this operator does not grant ({p}): remove it, \
                     or have the cluster's administrator allow it (Helm value jobPolicy.allow: [{p}])"
                ));
            }
        }
        Ok(())
    }
}

/// Every privilege the template asks for, with its field.
fn asked(t: &JobTemplateSpec) -> Vec<(&'static str, Privilege)> {
    let mut out = Vec::new();
    if t.host_network {
        out.push(("hostNetwork", Privilege::HostNetwork));
    }
    let Some(sc) = &t.security_context else { return out };
    if sc.privileged == Some(true) {
        out.push(("securityContext.privileged", Privilege::Privileged));
    }
    if sc.capabilities.as_ref().and_then(|c| c.add.as_ref()).is_some_and(|a| !a.is_empty()) {
        out.push(("securityContext.capabilities.add", Privilege::AddCapabilities));
    }
    if sc.allow_privilege_escalation == Some(true) {
        out.push(("securityContext.allowPrivilegeEscalation", Privilege::PrivilegeEscalation));
    }
    if sc.run_as_user == Some(0) {
        out.push(("securityContext.runAsUser", Privilege::RunAsRoot));
    }
    if sc.run_as_non_root == Some(false) {
        out.push(("securityContext.runAsNonRoot", Privilege::RunAsRoot));
    }
    if sc.seccomp_profile.as_ref().is_some_and(|s| s.type_ != "RuntimeDefault" && s.type_ != "Localhost") {
        out.push(("securityContext.seccompProfile.type", Privilege::Unconfined));
    }
    if sc.proc_mount.as_deref().is_some_and(|m| m != "Default") {
        out.push(("securityContext.procMount", Privilege::Unconfined));
    }
    if sc.app_armor_profile.as_ref().is_some_and(|p| p.type_ != "RuntimeDefault" && p.type_ != "Localhost") {
        out.push(("securityContext.appArmorProfile.type", Privilege::Unconfined));
    }
    if sc.se_linux_options.is_some() {
        out.push(("securityContext.seLinuxOptions", Privilege::Unconfined));
    }
    // A Windows HostProcess container is the node's administrator.
    if sc.windows_options.as_ref().is_some_and(|w| w.host_process == Some(true)) {
        out.push(("securityContext.windowsOptions.hostProcess", Privilege::Unconfined));
    }
    out
}

/// Non-root, read-only root filesystem, no privilege escalation, no capabilities, RuntimeDefault
/// seccomp: what the `restricted` Pod Security Standard asks of a container.
pub fn restricted_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUNNER_UID),
        run_as_group: Some(RUNNER_UID),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..Default::default()
    }
}

/// The restricted defaults with each field the override sets taken from it; `ALL` stays among
/// the dropped capabilities whatever the override drops.
pub fn merged_context(over: Option<&SecurityContext>) -> SecurityContext {
    let mut sc = restricted_context();
    let Some(o) = over else { return sc };
    macro_rules! take {
        ($($f:ident),*) => { $( if o.$f.is_some() { sc.$f = o.$f.clone(); } )* };
    }
    take!(
        run_as_non_root,
        run_as_user,
        run_as_group,
        read_only_root_filesystem,
        allow_privilege_escalation,
        privileged,
        seccomp_profile,
        proc_mount,
        se_linux_options,
        windows_options,
        app_armor_profile
    );
    // Root asked for (and allowed): the default runAsNonRoot would keep the pod from starting.
    if o.run_as_user == Some(0) && o.run_as_non_root.is_none() {
        sc.run_as_non_root = None;
    }
    if let Some(c) = &o.capabilities {
        let mut drop: Vec<String> = vec!["ALL".into()];
        for d in c.drop.iter().flatten() {
            if !drop.contains(d) {
                drop.push(d.clone());
            }
        }
        sc.capabilities = Some(Capabilities { drop: Some(drop), add: c.add.clone().filter(|a| !a.is_empty()) });
    }
    sc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(yaml: &str) -> JobTemplateSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn an_override_keeps_every_restricted_default_it_does_not_set() {
        let t = template("securityContext: { runAsUser: 1000, capabilities: { drop: [NET_RAW] } }");
        let sc = merged_context(t.security_context.as_ref());
        assert_eq!(sc.run_as_user, Some(1000));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        assert_eq!(sc.capabilities.unwrap().drop.unwrap(), vec!["ALL".to_string(), "NET_RAW".into()]);
        assert_eq!(merged_context(None), restricted_context());
    }

    #[test]
    fn each_privilege_is_refused_with_its_field_unless_allowed() {
        let cases = [
            ("hostNetwork: true", "spec.jobTemplate.hostNetwork", Privilege::HostNetwork),
            ("securityContext: { privileged: true }", "securityContext.privileged", Privilege::Privileged),
            ("securityContext: { capabilities: { add: [SYS_ADMIN] } }", "capabilities.add", Privilege::AddCapabilities),
            (
                "securityContext: { allowPrivilegeEscalation: true }",
                "allowPrivilegeEscalation",
                Privilege::PrivilegeEscalation,
            ),
            ("securityContext: { runAsUser: 0 }", "securityContext.runAsUser", Privilege::RunAsRoot),
            ("securityContext: { runAsNonRoot: false }", "securityContext.runAsNonRoot", Privilege::RunAsRoot),
            ("securityContext: { seccompProfile: { type: Unconfined } }", "seccompProfile.type", Privilege::Unconfined),
            ("securityContext: { procMount: Unmasked }", "procMount", Privilege::Unconfined),
            ("securityContext: { seLinuxOptions: { type: spc_t } }", "seLinuxOptions", Privilege::Unconfined),
            ("securityContext: { appArmorProfile: { type: Unconfined } }", "appArmorProfile", Privilege::Unconfined),
            ("securityContext: { windowsOptions: { hostProcess: true } }", "hostProcess", Privilege::Unconfined),
        ];
        for (yaml, field, p) in cases {
            let t = template(yaml);
            let e = JobPolicy::default().check(&t).unwrap_err();
            assert!(e.contains(field) && e.contains(&format!("jobPolicy.allow: [{p}]")), "{yaml}: {e}");
            let allowed = JobPolicy { allow: BTreeSet::from([p]) };
            assert_eq!(allowed.check(&t), Ok(()), "{yaml}");
        }
        let harmless = template("securityContext: { runAsUser: 1000, readOnlyRootFilesystem: true }");
        assert_eq!(JobPolicy::default().check(&harmless), Ok(()));
    }

    #[test]
    fn the_allow_list_parses_names_and_refuses_others() {
        assert_eq!(JobPolicy::parse("").unwrap(), JobPolicy::default());
        let p = JobPolicy::parse("hostNetwork, runAsRoot").unwrap();
        assert_eq!(p.allow, BTreeSet::from([Privilege::HostNetwork, Privilege::RunAsRoot]));
        let e = JobPolicy::parse("hostNetwork,root").unwrap_err();
        assert!(e.contains("\"root\"") && e.contains("runAsRoot"), "{e}");
    }
}
