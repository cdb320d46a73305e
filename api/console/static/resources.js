// VM and volume pages: their backups with a copy per storage, and what can be done with them.
import { html, useState } from "./vendor/preact-htm.js";
import * as api from "./api.js";
import { Badge, ErrorBox, FormDialog, Modal, StorageOptions, filled, formatBytes, formatDate, short, useLoad } from "./ui.js";

function Copies({ refs, storages }) {
  const names = Object.fromEntries(storages.map((s) => [s.uuid, s.name]));
  return html`<ul class="plain">${refs.map(
    (r) => html`<li>${names[r.backupStorageUuid] || short(r.backupStorageUuid)} <${Badge} value=${r.status} /></li>`,
  )}</ul>`;
}

function BackupNowDialog({ title, storages, onClose, onSubmit }) {
  return html`<${FormDialog} title=${title} submitLabel="Back up" onClose=${onClose} onSubmit=${onSubmit}>
    <label>Mode
      <select name="mode"><option value="auto">auto (incremental when an earlier backup exists)</option>
        <option value="full">full</option><option value="incremental">incremental</option></select>
    </label>
    <label>Backup storage <select name="backupStorageUuid"><${StorageOptions} storages=${storages.filter((s) => s.role === "master" || s.type !== "ImageStore")} /></select></label>
    <label>Name <input name="name" placeholder="default: backup-<name>" /></label>
  <//>`;
}

/** The dialogs of one backup (a volume backup, or a VM backup when group is set). */
function BackupDialog({ kind, target, storages, ctx, onClose, onChanged }) {
  const { backup, group } = target;
  const path = group ? `/v1/vm-backups/${group.uuid}` : `/v1/volume-backups/${backup.uuid}`;
  const label = group ? `VM backup ${group.name}` : `backup ${backup.name}`;
  const held = storages.filter((s) => (group ? group.backups : [backup]).some((b) => b.backupStorageRefs.some((r) => r.backupStorageUuid === s.uuid)));
  const run = (what, answer) => ctx.follow(`${what}: ${label}`, answer, onChanged);
  if (kind === "revert") {
    return html`<${FormDialog} title="Revert ${group ? "the VM" : "the volume"}" submitLabel="Revert" danger onClose=${onClose}
      onSubmit=${async (v) => run("Revert", await api.action(path, group ? "revertVmFromVmBackup" : "revertVolumeFromVolumeBackup", filled(v)))}>
      <p>Overwrites ${group ? html`every volume of the VM (${group.backups.length})` : html`the volume`} with ${label} of ${formatDate((backup || group).createDate)}. What was written since is lost.</p>
      <label>Read from <select name="backupStorageUuid"><option value="">default</option><${StorageOptions} storages=${held} includeDefault=${false} /></select></label>
    <//>`;
  }
  if (kind === "newVolume") {
    return html`<${FormDialog} title="New volume from ${label}" submitLabel="Create volume" onClose=${onClose}
      onSubmit=${async (v) => run("New volume", await api.action(path, "createDataVolumeFromVolumeBackup", filled(v)))}>
      <label>Name of the new volume <input name="name" required /></label>
      <label>Read from <select name="backupStorageUuid"><option value="">default</option><${StorageOptions} storages=${held} includeDefault=${false} /></select></label>
      <p class="muted">The volume is placed beside the backed-up volume, on its host.</p>
    <//>`;
  }
  if (kind === "sync") {
    const others = storages.filter((s) => !held.includes(s));
    return html`<${FormDialog} title="Copy ${label} to another storage" submitLabel="Sync" onClose=${onClose}
      onSubmit=${async (v) => {
        const params = filled({ ...v, bandwidthLimit: v.bandwidthLimit ? Number(v.bandwidthLimit) : "" });
        run("Sync", await api.action(path, group ? "syncVmBackupFromImageStoreBackupStorage" : "syncBackupFromImageStoreBackupStorage", params));
      }}>
      <label>To <select name="dstBackupStorageUuid" required>${(others.length ? others : storages).map((s) => html`<option value=${s.uuid}>${s.name} (${s.type})</option>`)}</select></label>
      <label>Bandwidth limit (bytes/s) <input name="bandwidthLimit" type="number" min="1" /></label>
    <//>`;
  }
  if (kind === "verify") {
    return html`<${FormDialog} title="Verify ${label}" submitLabel="Verify" onClose=${onClose}
      onSubmit=${async (v) => run("Verify", await api.action(path, "verifyVolumeBackup", filled({ backupStorageUuid: v.backupStorageUuid, readData: v.readData === "on" })))}>
      <label>On <select name="backupStorageUuid"><option value="">default</option><${StorageOptions} storages=${held} includeDefault=${false} /></select></label>
      <label class="check"><input type="checkbox" name="readData" /> Re-read and re-hash every chunk</label>
    <//>`;
  }
  if (kind === "instant") {
    return html`<${FormDialog} title="Instant recovery from ${label}" submitLabel="Start" onClose=${onClose}
      onSubmit=${async (v) => run("Instant recovery", await api.action(path, group ? "instantRestoreVmFromVmBackup" : "instantRestoreVolumeFromVolumeBackup", filled(v)))}>
      <p>Runs ${group ? "the VM" : "the volume"} from the backup at once and streams the rest in the background.</p>
      <label>Read from <select name="backupStorageUuid"><option value="">default</option><${StorageOptions} storages=${held} includeDefault=${false} /></select></label>
    <//>`;
  }
  if (kind === "files") return html`<${FileBrowser} backup=${backup} onClose=${onClose} />`;
  // delete: name exactly what goes
  const backups = group ? group.backups : [backup];
  return html`<${FormDialog} title="Delete ${label}" submitLabel="Delete" danger onClose=${onClose}
    onSubmit=${async (v, form) => {
      const chosen = [...form.querySelectorAll("input[name=storage]:checked")].map((i) => i.value);
      if (!chosen.length) throw new api.ApiError(0, "NOTHING_CHOSEN", "choose at least one storage");
      const query = chosen.length === held.length ? {} : { backupStorageUuids: chosen.join(",") };
      run("Delete", await api.remove(path, query));
    }}>
    <p>Deletes ${group ? html`the VM backup <strong>${group.name}</strong> of ${formatDate(group.createDate)}, that is ${backups.length} volume backups:` : html`the backup <strong>${backup.name}</strong> of ${formatDate(backup.createDate)}:`}</p>
    <ul>${backups.map((b) => html`<li><span class="mono">${b.uuid}</span> ${b.type} ${formatBytes(b.size)}</li>`)}</ul>
    <fieldset><legend>From these storages (a backup with no copy left is gone)</legend>
      ${held.map((s) => html`<label class="check"><input type="checkbox" name="storage" value=${s.uuid} checked /> ${s.name} (${s.type})</label>`)}
    </fieldset>
  <//>`;
}

function FileBrowser({ backup, onClose }) {
  const [path, setPath] = useState("/");
  const listing = useLoad(() => api.get(`/v1/volume-backups/${backup.uuid}/files`, { path }), [path]);
  const entries = (listing.data && (listing.data.inventories || listing.data.entries || listing.data.files)) || [];
  const download = async (entry) => {
    const filePath = entry.path || `${path.replace(/\/$/, "")}/${entry.name}`;
    const auth = api.currentAuth();
    const response = await fetch(`/v1/volume-backups/${backup.uuid}/files/content?path=${encodeURIComponent(filePath)}`, {
      headers: { Authorization: `Bearer ${auth.token}` },
    });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = entry.name || filePath.split("/").pop();
    link.click();
  };
  return html`<${Modal} title="Files in ${backup.name}" onClose=${onClose}>
    <p><span class="mono">${path}</span> ${path !== "/" ? html`<button type="button" onClick=${() => setPath(path.replace(/\/[^/]*\/?$/, "") || "/")}>Up</button>` : null}</p>
    <${ErrorBox} error=${listing.error} />
    <ul class="plain">${entries.map((e) => {
      const isDir = e.type === "directory" || e.type === "dir" || e.isDirectory;
      return html`<li>${isDir
        ? html`<button type="button" onClick=${() => setPath(e.path || `${path.replace(/\/$/, "")}/${e.name}`)}>${e.name}/</button>`
        : html`<button type="button" onClick=${() => download(e)}>${e.name}</button> <span class="muted">${formatBytes(e.size)}</span>`}</li>`;
    })}</ul>
    <div class="actions"><button type="button" onClick=${onClose}>Close</button></div>
  <//>`;
}

function BackupButtons({ open, target, features, single }) {
  return html`<div class="actions">
    <button type="button" onClick=${() => open("revert", target)}>Revert</button>
    ${single ? html`<button type="button" onClick=${() => open("newVolume", target)}>New volume</button>` : null}
    <button type="button" onClick=${() => open("sync", target)}>Sync</button>
    ${single ? html`<button type="button" onClick=${() => open("verify", target)}>Verify</button>` : null}
    ${(single ? features.instantRestore : features.instantRestoreVm) ? html`<button type="button" onClick=${() => open("instant", target)}>Instant recovery</button>` : null}
    ${single && features.fileBrowser ? html`<button type="button" onClick=${() => open("files", target)}>Files</button>` : null}
    <button type="button" class="danger" onClick=${() => open("delete", target)}>Delete</button>
  </div>`;
}

function BackupTable({ backups, storages, open, features }) {
  if (!backups.length) return html`<p class="muted">No backup yet.</p>`;
  return html`<div class="table-wrap"><table class="responsive backups">
    <thead><tr><th>Backup</th><th>Date</th><th>Mode</th><th>Status</th><th class="num">Size</th><th>Copies</th><th>Actions</th></tr></thead>
    <tbody>${backups.map(
      (b) => html`<tr data-backup=${b.uuid}>
        <td data-label="Backup">${b.name} <span class="mono muted">${short(b.uuid)}</span></td>
        <td data-label="Date">${formatDate(b.createDate)}</td>
        <td data-label="Mode">${b.mode}</td>
        <td data-label="Status"><${Badge} value=${b.status} /></td>
        <td data-label="Size" class="num">${formatBytes(b.size)}</td>
        <td data-label="Copies"><${Copies} refs=${b.backupStorageRefs} storages=${storages} /></td>
        <td data-label="Actions">${b.status === "Ready" ? html`<${BackupButtons} open=${open} target=${{ backup: b }} features=${features} single />` : null}</td>
      </tr>`,
    )}</tbody></table></div>`;
}

function useDialogs(storages, ctx, reload) {
  const [dialog, setDialog] = useState(null);
  const open = (kind, target) => setDialog({ kind, target });
  const element = dialog
    ? html`<${BackupDialog} kind=${dialog.kind} target=${dialog.target} storages=${storages} ctx=${ctx}
        onClose=${() => setDialog(null)} onChanged=${reload} />`
    : null;
  return [open, element];
}

export function VmPage({ id, ctx }) {
  const [backingUp, setBackingUp] = useState(false);
  const { data, error, reload } = useLoad(async () => {
    const [vm, volumes, storages] = await Promise.all([
      api.getOne("vm-instances", id),
      api.rows("volumes", [`vmInstanceUuid=${id}`], { sort: "+createDate" }),
      api.rows("backup-storage"),
    ]);
    const backups = volumes.length
      ? await api.rows("volume-backups", [`volumeUuid?=${volumes.map((v) => v.uuid).join(",")}`], { sort: "-createDate", limit: 1000 })
      : [];
    return { vm, volumes, storages, backups };
  }, [id]);
  const [open, dialog] = useDialogs(data ? data.storages : [], ctx, reload);
  if (!data) return html`<h1>VM</h1><${ErrorBox} error=${error} />`;
  const { vm, volumes, storages, backups } = data;
  const root = volumes.find((v) => v.type === "Root");
  const groups = [];
  for (const b of backups) {
    if (!b.groupUuid) continue;
    let group = groups.find((g) => g.uuid === b.groupUuid);
    if (!group) groups.push((group = { uuid: b.groupUuid, name: b.name, createDate: b.createDate, backups: [] }));
    group.backups.push(b);
  }
  return html`<h1>VM ${vm.name}</h1>
    <${ErrorBox} error=${error} />
    <section class="panel">
      <p><span class="muted">uuid</span> <span class="mono">${vm.uuid}</span> · <span class="muted">state</span> ${vm.state} · <span class="muted">host</span> <span class="mono">${short(vm.hostUuid)}</span></p>
      ${root
        ? html`<button type="button" class="primary" onClick=${() => setBackingUp(true)}>Back up the VM now</button>`
        : html`<p class="muted">The VM has no root volume: back its volumes up one by one.</p>`}
    </section>
    <section class="panel"><h2>Volumes</h2>
      <table class="responsive" id="volumes"><thead><tr><th>Volume</th><th>Type</th><th>Format</th><th class="num">Size</th><th>Path</th></tr></thead><tbody>
        ${volumes.map((v) => html`<tr><td data-label="Volume"><a href="#/volume/${v.uuid}">${v.name}</a></td><td data-label="Type">${v.type}</td>
          <td data-label="Format">${v.format}</td><td data-label="Size" class="num">${formatBytes(v.size)}</td><td data-label="Path" class="mono">${v.installPath}</td></tr>`)}
      </tbody></table>
    </section>
    <section class="panel"><h2>VM backups</h2>
      ${groups.length === 0
        ? html`<p class="muted">No VM backup yet.</p>`
        : html`<div class="table-wrap"><table class="responsive" id="vm-backups"><thead><tr><th>VM backup</th><th>Date</th><th>Modes</th><th>Status</th><th class="num">Size</th><th>Copies</th><th>Actions</th></tr></thead><tbody>
          ${groups.map((g) => {
            const ready = g.backups.every((b) => b.status === "Ready");
            return html`<tr data-group=${g.uuid}><td data-label="VM backup">${g.name} <span class="mono muted">${short(g.uuid)}</span></td>
              <td data-label="Date">${formatDate(g.createDate)}</td>
              <td data-label="Modes">${[...new Set(g.backups.map((b) => b.mode))].join(", ")}</td>
              <td data-label="Status"><${Badge} value=${ready ? "Ready" : g.backups.find((b) => b.status !== "Ready").status} /></td>
              <td data-label="Size" class="num">${formatBytes(g.backups.reduce((n, b) => n + (b.size || 0), 0))}</td>
              <td data-label="Copies">${g.backups.map((b) => html`<div><span class="muted">${b.type}</span> <${Copies} refs=${b.backupStorageRefs} storages=${storages} /></div>`)}</td>
              <td data-label="Actions">${ready ? html`<${BackupButtons} open=${open} target=${{ group: g }} features=${ctx.features} />` : null}</td></tr>`;
          })}</tbody></table></div>`}
    </section>
    ${backingUp
      ? html`<${BackupNowDialog} title="Back up VM ${vm.name}" storages=${storages} onClose=${() => setBackingUp(false)}
          onSubmit=${async (v) => ctx.follow(`Back up VM ${vm.name}`, (await api.call("POST", `/v1/volumes/${root.uuid}/vm-backups`, { body: { params: filled(v) } })).data, reload)} />`
      : null}
    ${dialog}`;
}

export function VolumePage({ id, ctx }) {
  const [backingUp, setBackingUp] = useState(false);
  const { data, error, reload } = useLoad(async () => {
    const [volume, storages, backups] = await Promise.all([
      api.getOne("volumes", id),
      api.rows("backup-storage"),
      api.rows("volume-backups", [`volumeUuid=${id}`], { sort: "-createDate", limit: 1000 }),
    ]);
    return { volume, storages, backups };
  }, [id]);
  const [open, dialog] = useDialogs(data ? data.storages : [], ctx, reload);
  if (!data) return html`<h1>Volume</h1><${ErrorBox} error=${error} />`;
  const { volume, storages, backups } = data;
  return html`<h1>Volume ${volume.name}</h1>
    <section class="panel">
      <p><span class="muted">uuid</span> <span class="mono">${volume.uuid}</span> · ${volume.type} · ${volume.format} · ${formatBytes(volume.size)} · <span class="mono">${volume.installPath}</span>
        ${volume.vmInstanceUuid ? html` · VM <a href="#/vm/${volume.vmInstanceUuid}">${short(volume.vmInstanceUuid)}</a>` : null}</p>
      <button type="button" class="primary" onClick=${() => setBackingUp(true)}>Back up the volume now</button>
    </section>
    <section class="panel"><h2>Backups</h2><${BackupTable} backups=${backups} storages=${storages} open=${open} features=${ctx.features} /></section>
    ${backingUp
      ? html`<${BackupNowDialog} title="Back up volume ${volume.name}" storages=${storages} onClose=${() => setBackingUp(false)}
          onSubmit=${async (v) => ctx.follow(`Back up ${volume.name}`, (await api.call("POST", `/v1/volumes/${volume.uuid}/volume-backups`, { body: { params: filled(v) } })).data, reload)} />`
      : null}
    ${dialog}`;
}
