// Root entries of index.json: finding the entry a name selects, and replacing it.
import type { Descriptor, ImageIndex } from '../manifest.js'
import { type CacheName, REF_NAME, entryName, storedKey } from './names.js'

/** True when the entry is named `key` (its stored name, or that name normalised). */
export function isNamed(d: Descriptor, key: string): boolean {
  const n = entryName(d)
  return n === key || (n !== undefined && storedKey(n) === key)
}

/**
 * The root entry a cache name selects: for a reference with a digest, the entry of exactly that
 * name, else any root of that digest (whatever its name); otherwise the entry of that name.
 */
export function findEntry(index: ImageIndex, name: CacheName): Descriptor | undefined {
  const exact = index.manifests.find((d) => entryName(d) === name.key)
  if (exact) return exact
  if (name.digest) return index.manifests.find((d) => d.digest === name.digest)
  return index.manifests.find((d) => isNamed(d, name.key))
}

/**
 * index.json with the entry for `key` set to `d` (named `key`), in the place of the first entry
 * of that name; further entries of the name are dropped. The index given is not changed.
 */
export function withEntry(index: ImageIndex, key: string, d: Descriptor): ImageIndex {
  const entry: Descriptor = { ...d, annotations: { ...d.annotations, [REF_NAME]: key } }
  const manifests: Descriptor[] = []
  let placed = false
  for (const e of index.manifests) {
    if (!isNamed(e, key)) manifests.push(e)
    else if (!placed) {
      manifests.push(entry)
      placed = true
    }
  }
  if (!placed) manifests.push(entry)
  return { ...index, manifests }
}
