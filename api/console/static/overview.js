// Overview: every VM's protection, running jobs, last day's failures, hosts, storage (GET /v1/overview).
import { html, useEffect, useMemo, useState } from "./vendor/preact-htm.js";
import * as api from "./api.js";
import { Badge, ErrorBox, Progress, age, formatBytes, formatDate, formatDuration, short, useLoad } from "./ui.js";

const KIND_LABEL = { standby: "Standby", remote: "Remote", cloud: "Cloud" };
const REFRESH_MS = 10000;
const PAGE_ROWS = 100; // VM rows a page of the table shows

/** A running API job's progress, polled at GET /v1/api-jobs/{uuid} while it runs. */
function LiveProgress({ job }) {
  const [state, setState] = useState({ progress: job.progress, done: false, error: null });
  useEffect(() => {
    let stop = false;
    const poll = async () => {
      try {
        const now = await api.jobState(job.uuid);
        if (stop) return;
        setState({ progress: now.done ? 100 : now.progress, done: now.done, error: null });
        if (!now.done) setTimeout(poll, 1000);
      } catch (error) {
        if (!stop) setState((old) => ({ ...old, done: true, error }));
      }
    };
    poll();
    return () => {
      stop = true;
    };
  }, [job.uuid]);
  if (state.error) return html`<${Badge} value="Failed" /> ${state.error.message}`;
  if (state.done) return html`<${Badge} value="Ready" />`;
  return html`<${Progress} value=${state.progress} label=${`${job.action} progress`} />`;
}

function VmTable({ vms, kinds, showProject, projects }) {
  const [filter, setFilter] = useState("");
  const [status, setStatus] = useState("");
  const [page, setPage] = useState(0);
  const shown = useMemo(
    () =>
      vms.filter(
        (vm) =>
          (!status || vm.status === status) &&
          (!filter || vm.name.toLowerCase().includes(filter.toLowerCase()) || vm.uuid.startsWith(filter)),
      ),
    [vms, filter, status],
  );
  const pages = Math.max(1, Math.ceil(shown.length / PAGE_ROWS));
  const at = Math.min(page, pages - 1);
  const first = at * PAGE_ROWS;
  const choose = (setter) => (event) => {
    setter(event.target.value);
    setPage(0);
  };
  return html`<section class="panel" aria-labelledby="vms-title">
    <h2 id="vms-title">Virtual machines</h2>
    <form class="inline" role="search" onSubmit=${(e) => e.preventDefault()}>
      <label>Find <input type="search" value=${filter} onInput=${choose(setFilter)} placeholder="name or uuid" /></label>
      <label>Status
        <select value=${status} onChange=${choose(setStatus)}>
          <option value="">all</option><option value="ok">OK</option><option value="overdue">overdue</option>
          <option value="failed">failed</option><option value="none">no backup</option>
        </select>
      </label>
      <span class="muted">${shown.length} of ${vms.length}</span>
    </form>
    <${Pager} at=${at} pages=${pages} first=${first} count=${shown.length} setPage=${setPage} />
    <div class="table-wrap">
      <table class="responsive" id="vm-table">
        <thead><tr>
          <th>VM</th><th>Status</th>${showProject ? html`<th>Project</th>` : null}<th>Last good backup</th><th class="num">Age</th>
          <th class="num">Size</th>${kinds.map((k) => html`<th>${KIND_LABEL[k]} copy</th>`)}
        </tr></thead>
        <tbody>
          ${shown.slice(first, first + PAGE_ROWS).map(
            (vm) => html`<tr class="status-${vm.status}" data-vm=${vm.uuid}>
              <td data-label="VM"><a href="#/vm/${vm.uuid}">${vm.name || short(vm.uuid)}</a></td>
              <td data-label="Status"><${Badge} value=${vm.status} />${vm.status === "failed" && vm.lastFailure
                ? html` <span class="muted">${formatDate(vm.lastFailure)}</span>`
                : null}</td>
              ${showProject ? html`<td data-label="Project">${projects[vm.projectUuid] || (vm.projectUuid ? short(vm.projectUuid) : "–")}</td>` : null}
              <td data-label="Last good backup">${vm.lastBackup ? formatDate(vm.lastBackup.createDate) : "none"}</td>
              <td data-label="Age" class="num">${vm.lastBackup ? formatDuration(vm.lastBackup.ageSeconds) : "–"}</td>
              <td data-label="Size" class="num">${vm.lastBackup ? formatBytes(vm.lastBackup.size) : "–"}</td>
              ${kinds.map(
                (k) => html`<td data-label="${KIND_LABEL[k]} copy">${!vm.lastBackup
                  ? "–"
                  : vm.copies[k]
                    ? html`<span class="badge ok">current</span>`
                    : html`<span class="badge warn">behind</span>`}</td>`,
              )}
            </tr>`,
          )}
        </tbody>
      </table>
    </div>
    ${pages > 1 ? html`<${Pager} at=${at} pages=${pages} first=${first} count=${shown.length} setPage=${setPage} />` : null}
  </section>`;
}

/** Previous / next page of the VM table. The whole table of 1,000 VMs took chromium 0.4–0.6 s
 * to lay out on a loaded 2-core machine (docs/benchmarks.md); a page of rows is quick, and every
 * VM stays a filter or a page away. */
function Pager({ at, pages, first, count, setPage }) {
  if (pages <= 1) return null;
  return html`<nav class="inline pager" aria-label="VM table pages">
    <button type="button" disabled=${at === 0} onClick=${() => setPage(at - 1)}>Previous</button>
    <span>VMs ${first + 1}–${Math.min(first + PAGE_ROWS, count)} of ${count} (page ${at + 1} of ${pages})</span>
    <button type="button" disabled=${at >= pages - 1} onClick=${() => setPage(at + 1)}>Next</button>
  </nav>`;
}

export function OverviewPage({ ctx }) {
  const { data, error, loading } = useLoad(() => api.get("/v1/overview"), [], REFRESH_MS);
  const projects = useLoad(async () => Object.fromEntries((await api.rows("projects")).map((p) => [p.uuid, p.name])), []);
  if (!data) return html`<h1>Overview</h1>${loading ? html`<p>Loading…</p>` : html`<${ErrorBox} error=${error} />`}`;
  const vms = data.vmInstances;
  const count = (s) => vms.filter((vm) => vm.status === s).length;
  const kinds = ["standby", "remote", "cloud"].filter((k) => data.backupStorage.some((s) => s.kind === k));
  return html`<h1>Overview</h1>
    <${ErrorBox} error=${error} />
    <div class="tiles" aria-label="Summary">
      <div class="tile"><span class="n">${vms.length}</span>VMs</div>
      <div class="tile ok"><span class="n">${count("ok")}</span>protected</div>
      <div class="tile overdue"><span class="n">${count("overdue")}</span>overdue</div>
      <div class="tile failed"><span class="n">${count("failed")}</span>failed</div>
      <div class="tile"><span class="n">${count("none")}</span>no backup</div>
      <div class="tile"><span class="n">${data.runningJobs.length}</span>jobs running</div>
    </div>
    <${VmTable} vms=${vms} kinds=${kinds} showProject=${Object.keys(projects.data || {}).length > 0} projects=${projects.data || {}} />
    <div class="grid2">
      <section class="panel" aria-labelledby="running-title">
        <h2 id="running-title">Running jobs</h2>
        ${data.runningJobs.length === 0
          ? html`<p class="muted">No API job is running.</p>`
          : html`<table id="running-jobs"><thead><tr><th>Job</th><th>Resource</th><th>Started</th><th>Progress</th></tr></thead><tbody>
              ${data.runningJobs.map(
                (job) => html`<tr data-job=${job.uuid}><td>${job.action}</td><td class="mono">${short(job.resourceUuid)}</td>
                  <td>${age(job.createDate)} ago</td><td><${LiveProgress} job=${job} /></td></tr>`,
              )}</tbody></table>`}
      </section>
      <section class="panel" aria-labelledby="failures-title">
        <h2 id="failures-title">Failures in the last 24 hours</h2>
        ${data.failures.length === 0
          ? html`<p class="muted">Nothing failed.</p>`
          : html`<div class="table-wrap"><table id="failures"><thead><tr><th>When</th><th>What</th><th>Reason</th></tr></thead><tbody>
              ${data.failures.map(
                (f) => html`<tr><td>${formatDate(f.date)}</td>
                  <td>${f.source === "jobHistory" ? "scheduled run" : f.action} <span class="mono">${short(f.resourceUuid)}</span></td>
                  <td>${f.code ? html`<strong>${f.code}</strong>: ` : null}${f.reason || "–"}</td></tr>`,
              )}</tbody></table></div>`}
      </section>
      ${ctx.me.admin
        ? html`<section class="panel" aria-labelledby="hosts-title">
            <h2 id="hosts-title">Hosts</h2>
            ${data.hosts.length === 0
              ? html`<p class="muted">No host has registered yet (a worker registers its host when it starts).</p>`
              : html`<table id="hosts" class="responsive"><thead><tr><th>Host</th><th>Status</th><th>Last heartbeat</th></tr></thead><tbody>
                  ${data.hosts.map(
                    (h) => html`<tr><td data-label="Host">${h.name || h.hostname || short(h.uuid)}</td><td data-label="Status"><${Badge} value=${h.status} /></td>
                      <td data-label="Last heartbeat">${h.lastHeartbeat ? `${age(h.lastHeartbeat)} ago` : "never"}</td></tr>`,
                  )}</tbody></table>`}
          </section>`
        : null}
      <section class="panel" aria-labelledby="storage-title">
        <h2 id="storage-title">Backup storage</h2>
        <div class="table-wrap"><table id="storage" class="responsive"><thead><tr><th>Storage</th><th>Status</th><th>Used</th><th>Sync lag</th></tr></thead><tbody>
          ${data.backupStorage.map((s) => {
            const used = s.totalCapacity ? (s.totalCapacity - s.availableCapacity) / s.totalCapacity : 0;
            const lag = s.syncLag;
            return html`<tr data-storage=${s.uuid}>
              <td data-label="Storage">${s.name} <span class="muted">${s.type}${s.type === "ImageStore" ? ` ${s.role}` : ""}</span></td>
              <td data-label="Status"><${Badge} value=${s.status} /></td>
              <td data-label="Used"><meter min="0" max="1" high="0.85" value=${used} aria-label="${Math.round(used * 100)}% used"></meter>
                ${" "}${formatBytes(s.totalCapacity - s.availableCapacity)} of ${formatBytes(s.totalCapacity)}</td>
              <td data-label="Sync lag">${!lag
                ? html`<span class="muted">master</span>`
                : lag.missingBackups === 0
                  ? html`<span class="badge ok">in sync</span>`
                  : html`<span class="badge warn">${lag.atLeast ? "≥ " : ""}${lag.missingBackups} behind, ${formatDuration(lag.seconds)}</span>`}</td>
            </tr>`;
          })}
        </tbody></table></div>
      </section>
    </div>
    <p class="muted">Updated ${formatDate(data.generatedAt)}; refreshes every ${REFRESH_MS / 1000} s.</p>`;
}
