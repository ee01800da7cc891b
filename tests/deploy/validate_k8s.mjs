// Validates Kubernetes objects offline: node validate_k8s.mjs FILE.yaml OUT.ts
//   1. every document parses and names apiVersion, kind, metadata.name;
//   2. kubernetes-models' validators (compiled from the Kubernetes OpenAPI
//      schemas) accept it: types and required fields;
//   3. writes OUT.ts, each object as a constant of its kubernetes-types type,
//      for tsc --strict: its excess-property check rejects unknown fields at
//      any depth (the validators let those through).
// Exit 1 listing every problem of steps 1-2; step 3 is run_tsc.sh's.
import { readFileSync, writeFileSync } from 'node:fs';
import { parseAllDocuments } from 'yaml';

const [file, out] = process.argv.slice(2);
const problems = [];
const docs = parseAllDocuments(readFileSync(file, 'utf8'));
const objects = [];
for (const [i, doc] of docs.entries()) {
  if (doc.errors.length > 0) {
    problems.push(`document ${i}: ${doc.errors.map((e) => e.message).join('; ')}`);
    continue;
  }
  const o = doc.toJS();
  if (o === null || o === undefined) continue;
  const where = `document ${i} (${o.kind ?? '?'} ${o.metadata?.name ?? '?'})`;
  if (typeof o.apiVersion !== 'string' || typeof o.kind !== 'string' || typeof o.metadata?.name !== 'string') {
    problems.push(`${where}: apiVersion, kind and metadata.name are required`);
    continue;
  }
  let Model;
  try {
    Model = (await import(`kubernetes-models/${o.apiVersion}/${o.kind}`))[o.kind];
  } catch {
    problems.push(`${where}: unknown apiVersion/kind ${o.apiVersion}/${o.kind}`);
    continue;
  }
  try {
    new Model(o).validate();
  } catch (e) {
    problems.push(`${where}: ${e.message}`);
  }
  objects.push(o);
}

// kubernetes-types spells Quantity as string; YAML may hold numbers there.
function quantitiesAsStrings(value, key) {
  if (Array.isArray(value)) return value.map((v) => quantitiesAsStrings(v));
  if (value !== null && typeof value === 'object') {
    const quantityMap = key === 'requests' || key === 'limits' || key === 'capacity';
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [
      k, quantityMap && typeof v === 'number' ? String(v) : quantitiesAsStrings(v, k)]));
  }
  if (key === 'sizeLimit' && typeof value === 'number') return String(value);
  return value;
}
const modules = new Map();
const lines = [];
for (const [i, o] of objects.entries()) {
  const [group, version] = o.apiVersion.includes('/') ? o.apiVersion.split('/') : ['core', o.apiVersion];
  const path = `kubernetes-types/${group.split('.')[0]}/${version}`;
  const alias = path.replace(/[^a-z0-9]/gi, '_');
  modules.set(alias, path);
  lines.push(`export const object${i}: ${alias}.${o.kind} = ${JSON.stringify(quantitiesAsStrings(o), null, 2)};`);
}
const header = [...modules].map(([alias, path]) => `import type * as ${alias} from '${path}';`);
writeFileSync(out, [...header, ...lines, ''].join('\n'));

if (problems.length > 0) {
  for (const p of problems) console.error(`validate_k8s: ${p}`);
  process.exit(1);
}
console.log(`validate_k8s: ${objects.length} objects pass the schema validators`);
