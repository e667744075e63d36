"""Candidates by element substitution into the structure types of training crystals, a candidate source for the
solver beside the random symmetric crystals and the diffusion model.

Most new inorganic crystals adopt a known structure type: a crystallographer facing a new powder pattern first
tries the prototypes of chemically similar compounds with the same stoichiometry, then lets the fit decide. This
module does that with the types of the training crystals (:data:`LIBRARIES`, built by
tools/build_prototype_library.py from structures that the benchmark they are used for never evaluates on): for a
cell content it lists every type with the same number of atoms and the same atom counts per element, renames the
type's elements to the target's (every assignment that keeps the counts), and ranks the results by a prior: how
common the type is and how similar the renamed elements are to those of the type's members (Pauling
electronegativity and atomic radius; chemical substitution as in Hautier et al., Inorg. Chem. 50, 656 (2011),
with a simpler similarity).
Each candidate keeps its type's symmetry, so the batched fit of :mod:`xtalsolve.polish` adjusts only its cell
and free coordinates.

When the library has no more types for the cell, its frameworks are re-decorated (:func:`redecorations`): a type
with the same number of atoms whose orbits (sets of symmetry-equivalent sites) can be shared out among the
cell's elements in another way than its own members do, e.g. a quaternary Heusler ordering on the four fcc
sublattices of the BiF3 type, or a rhombohedral carbonate-fluoride on a framework whose orbits hold other
elements. This reaches types that no training crystal has, still with known coordination geometry.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
from pymatgen.core import Composition, Element, Lattice, Structure

from xtalsolve.composition import predicted_volume
from xtalsolve.errors import XtalsolveError

ELECTRONEGATIVITY_SCALE = 0.5
"""Pauling units that count as one unit of chemical distance."""
RADIUS_SCALE = 0.25
"""Fractional difference in atomic radius that counts as one unit of chemical distance."""
CHEMISTRY_WEIGHT = 3.0
"""Log-prior points lost per unit of chemical distance (atom-weighted mean over roles); chosen on 400 crystals
of mp20_val (the rank of the true type and assignment, benchmarks/ not involved): 0 -> 3 raises top-1 from 28 to
44 %, top-32 from 75 to 83 %, flat beyond."""
MAX_ASSIGNMENTS = 24
"""Element assignments tried per type at most (the best by chemical distance)."""
DECORATIONS_PER_FRAMEWORK = 2
"""Re-decorations kept per framework (the best by chemical distance), so that one framework with many orbits
does not fill the list."""
DECORATION_SEARCH_NODES = 20_000
"""Search nodes per framework at most when sharing its orbits out among the elements (bounds the time for
frameworks of many small orbits, P1 cells)."""
LIBRARIES = {"extended": ("prototype_library.json.gz", "prototype_library_pxrdnet.json.gz"),
             "mp20": ("prototype_library.json.gz",)}
"""The shipped libraries by name, each a sequence of tiers (files); a later tier adds only the types that the
earlier ones lack, ranked after all of theirs. "mp20": the types of mp20_train (the MP-20 protocol's training
pool) minus the PXRDnet benchmark ids and duplicates, valid for both benchmarks. "extended": those first, then
the further types of the PXRDnet protocol's training pool (MP-20 val/test, MPTS-52, MP-40, AFLOW, WBM, perov-5,
carbon-24, zeolites, MOFs; cells of up to 52 atoms; the PXRDnet benchmark ids and duplicates left out): the
default for users and the PXRDnet benchmark, never for the MP-20 protocol (it holds most of mp20_test). Tiers,
not one pool, because measured on the PXRDnet protocol's first materials the flat pool's extra types (many from
hypothetical crystals) crowded true types out of the first 32 (LiVF6: 38th -> 71st), losing more than the new
types won. A path to a library file built by tools/build_prototype_library.py is a one-tier library."""
DEFAULT_LIBRARY = "extended"


@dataclass(frozen=True)
class Prototype:
    """One structure type of the library: space group (1-230), roles (atoms per cell and Wyckoff letters of each
    element, in role order), how many training crystals have it, element tuples of some members (role order) and
    representative cells (lattice rows in angstrom, fractional coordinates, role of each site)."""

    space_group: int
    roles: tuple[tuple[int, str], ...]
    count: int
    members: tuple[tuple[str, ...], ...]
    representatives: tuple[dict, ...]
    tier: int = 0

    @property
    def n_atoms(self) -> int:
        return sum(n for n, _ in self.roles)


def structure_type(structure: Structure, symprec: float = 0.1) -> tuple[int, tuple[tuple[int, str], ...], tuple]:
    """(space group, roles, elements by role) of a crystal: its structure type with the elements anonymised.
    Each element's role is its atoms per cell and the Wyckoff letters of its orbits (spglib at ``symprec``
    angstrom); elements are ordered by (atoms per cell, letters, Pauling electronegativity), so that crystals of
    one type list their elements role by role. Wyckoff letters depend on the origin spglib chooses, so one type
    can appear under equivalent letter sets (Heusler X on 1a or 1b); the library then lists it twice, which costs
    a candidate, not a solution. Raises ValueError when spglib finds no symmetry dataset."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    data = SpacegroupAnalyzer(structure, symprec=symprec).get_symmetry_dataset()
    if data is None:
        raise ValueError("spglib found no symmetry dataset")
    orbits = defaultdict(list)
    for site, (letter, orbit) in enumerate(zip(data.wyckoffs, data.equivalent_atoms)):
        if site == orbit:
            orbits[structure[site].specie].append(letter)
    counts = structure.composition
    elements = sorted(orbits, key=lambda el: (int(round(counts[el])), sorted(orbits[el]), el.X))
    roles = tuple((int(round(counts[el])), "".join(sorted(orbits[el]))) for el in elements)
    return int(data.number), roles, tuple(elements)


def signature(cell: Composition) -> tuple[int, tuple[int, ...]]:
    """Atoms per cell and the sorted atom counts per element: what a type must share with a cell content."""
    return _signature(int(round(v)) for v in cell.values())


def _signature(counts) -> tuple[int, tuple[int, ...]]:
    counts = tuple(sorted(counts))
    return sum(counts), counts


def check_library(name: str) -> str:
    """``name`` if it is a shipped library (:data:`LIBRARIES`) or an existing file; XtalsolveError otherwise."""
    if name not in LIBRARIES and not Path(name).is_file():
        raise XtalsolveError(f"unknown prototype library {name!r}: choose {', '.join(LIBRARIES)} or give a "
                             "library file (tools/build_prototype_library.py)", "--library")
    return name


def library(name: str = DEFAULT_LIBRARY) -> dict[tuple[int, tuple[int, ...]], list[Prototype]]:
    """A prototype library (:data:`LIBRARIES` name or file path), indexed by :func:`signature`: the types of its
    first tier, then those of later tiers that earlier ones lack (``Prototype.tier``). Read once."""
    return _merged(check_library(name))


@lru_cache(maxsize=4)  # one cache key per library, however it is asked for
def _merged(name: str) -> dict[tuple[int, tuple[int, ...]], list[Prototype]]:
    files = LIBRARIES.get(name, (name,))
    index: dict[tuple[int, tuple[int, ...]], list[Prototype]] = defaultdict(list)
    seen: set[tuple[int, tuple[tuple[int, str], ...]]] = set()
    for tier, file in enumerate(files):  # a file lists each type once, so one seen-set serves all tiers
        for key, protos in _read_library_file(file, shipped=name in LIBRARIES).items():
            for proto in protos:
                if (proto.space_group, proto.roles) not in seen:
                    index[key].append(replace(proto, tier=tier) if tier else proto)
                    seen.add((proto.space_group, proto.roles))
    return dict(index)


@lru_cache(maxsize=4)
def _read_library_file(file: str, shipped: bool) -> dict[tuple[int, tuple[int, ...]], list[Prototype]]:
    source = resources.files("xtalsolve.resources").joinpath(file) if shipped else None
    try:
        with (source.open("rb") if source is not None else open(file, "rb")) as raw_file:
            with gzip.open(raw_file, "rt") as handle:
                raw = json.load(handle)
        types = raw["types"]
    except (OSError, EOFError, ValueError, KeyError, TypeError) as error:
        raise XtalsolveError(f"not a prototype library ({type(error).__name__}: {error})", file) from None
    index: dict[tuple[int, tuple[int, ...]], list[Prototype]] = defaultdict(list)
    for entry in types:
        proto = Prototype(entry["space_group"], tuple((int(n), str(w)) for n, w in entry["roles"]), entry["count"],
                          tuple(tuple(m) for m in entry["members"]), tuple(entry["representatives"]))
        index[_signature(n for n, _ in proto.roles)].append(proto)
    return dict(index)


@lru_cache(maxsize=512)
def _properties(symbol: str) -> tuple[float, float]:
    element = Element(symbol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen warns that noble gases have no Pauling electronegativity
        x = element.X if element.X == element.X else 1.5
    radius = float(element.atomic_radius or 1.5)
    return float(x), radius


def element_distance(a: str, b: str) -> float:
    """Chemical distance of substituting element ``b`` by ``a``: electronegativity and radius differences in
    units of ``ELECTRONEGATIVITY_SCALE`` and ``RADIUS_SCALE``, summed."""
    xa, ra = _properties(a)
    xb, rb = _properties(b)
    return abs(xa - xb) / ELECTRONEGATIVITY_SCALE + abs(ra - rb) / (0.5 * (ra + rb)) / RADIUS_SCALE


def assignments(cell: Composition, proto: Prototype, members: tuple[tuple[str, ...], ...] | None = None
                ) -> list[tuple[tuple[str, ...], float]]:
    """Every way of giving the type's roles the cell's elements with matching atom counts, with its chemical
    distance (atom-weighted mean over roles of the distance to the closest member's element tuple), best first,
    at most ``MAX_ASSIGNMENTS``. ``members``: the element tuples to compare with (default all the type lists)."""
    members = proto.members if members is None else members
    by_count: dict[int, list[str]] = defaultdict(list)
    for element, amount in cell.items():
        by_count[int(round(amount))].append(element.symbol)
    slots: dict[int, list[int]] = defaultdict(list)
    for i, (n, _) in enumerate(proto.roles):
        slots[n].append(i)
    if sorted((n, len(v)) for n, v in by_count.items()) != sorted((n, len(v)) for n, v in slots.items()):
        return []
    weights = np.array([n for n, _ in proto.roles], dtype=float)
    weights /= weights.sum()
    groups = sorted(slots)
    out = []
    for perms in itertools.product(*(itertools.permutations(by_count[n]) for n in groups)):
        chosen = [""] * len(proto.roles)
        for n, perm in zip(groups, perms):
            for slot, symbol in zip(slots[n], perm):
                chosen[slot] = symbol
        distance = min(sum(w * element_distance(a, b) for w, a, b in zip(weights, chosen, member))
                       for member in members)
        out.append((tuple(chosen), float(distance)))
    out.sort(key=lambda item: item[1])
    return out[:MAX_ASSIGNMENTS]


@dataclass(frozen=True)
class Substitution:
    """A ranked candidate: the type, which representative cell, the elements by role and its log prior."""

    prototype: Prototype
    representative: int
    elements: tuple[str, ...]
    log_prior: float

    def structure(self, volume_A3: float) -> Structure:
        """The representative cell with the elements renamed, scaled to ``volume_A3`` (angstrom^3); its
        ``properties["origin"]`` names the type and the crystal the cell comes from."""
        species = [self.elements[r] for r in self.prototype.representatives[self.representative]["roles"]]
        return _representative_cell(self.prototype, self.representative, species, volume_A3, "prototype",
                                    f"({self.prototype.count} crystals in the library)")


def _representative_cell(proto: Prototype, representative: int, species: Sequence[str], volume_A3: float,
                         kind: str, note: str) -> Structure:
    """Representative ``representative`` of ``proto`` with ``species`` on its sites, scaled to ``volume_A3``
    (angstrom^3), its ``properties["origin"]`` "<kind>: space group N type of <compound> <id> <note>"."""
    rep = proto.representatives[representative]
    structure = Structure(Lattice(rep["lattice"]), list(species), rep["frac"])
    structure.scale_lattice(volume_A3)
    compound = Composition(dict(zip(rep["elements"], (n for n, _ in proto.roles)))).reduced_formula
    source = f"{compound} {rep['id']}" if "id" in rep else compound
    structure.properties["origin"] = f"{kind}: space group {proto.space_group} type of {source} {note}"
    return structure


def _same_compound(cell: Composition, proto: Prototype, elements: Sequence[str]) -> bool:
    return Composition({el: n for el, (n, _) in zip(elements, proto.roles)}) == cell


def _usable(cell: Composition, proto: Prototype, leave_out_compound: bool
            ) -> tuple[tuple[tuple[str, ...], ...], list[int]]:
    """The member element tuples and representative indices of ``proto`` to use for ``cell``: all, or with
    ``leave_out_compound`` those not of ``cell``'s own composition (either may then be empty)."""
    reps = list(range(len(proto.representatives)))
    if not leave_out_compound:
        return proto.members, reps
    return (tuple(m for m in proto.members if not _same_compound(cell, proto, m)),
            [k for k in reps if not _same_compound(cell, proto, proto.representatives[k]["elements"])])


@lru_cache(maxsize=64)  # the solver asks again for each round of Z trials
def ranked_substitutions(cell: Composition, leave_out_compound: bool = False, library_name: str = DEFAULT_LIBRARY
                         ) -> tuple[Substitution, ...]:
    """Every (type, representative, element assignment) that holds ``cell`` exactly, tier by tier of the library
    and best prior first within a tier: log of the type's member count minus ``CHEMISTRY_WEIGHT`` times the
    assignment's chemical distance; a type's further representatives (other cell shapes) follow its first at a
    small penalty.

    ``leave_out_compound``: ignore the library's own crystals of this very composition (as members to compare
    chemistry with and as representative cells), so that a benchmark on a known compound measures solving, not
    looking up; a type known only from this compound drops out. ``library_name``: see :data:`LIBRARIES`."""
    out = []
    for proto in library(library_name).get(signature(cell), []):
        members, reps = _usable(cell, proto, leave_out_compound)
        if not members or not reps:
            continue
        for elements, distance in assignments(cell, proto, members):
            base = math.log(proto.count + 1.0) - CHEMISTRY_WEIGHT * distance
            for rank, k in enumerate(reps):
                out.append(Substitution(proto, k, elements, base - 0.5 * rank))
    out.sort(key=lambda s: (s.prototype.tier, -s.log_prior))
    return tuple(out)


@dataclass(frozen=True)
class Decoration:
    """A ranked candidate from a framework: the type's first usable representative with its orbits given the
    cell's elements in a way no member of the type has (``species``: element of each site of representative
    ``representative``), and its log prior."""

    prototype: Prototype
    representative: int
    species: tuple[str, ...]
    log_prior: float

    def structure(self, volume_A3: float) -> Structure:
        """The re-decorated representative cell scaled to ``volume_A3`` (angstrom^3); its
        ``properties["origin"]`` names the framework and the crystal the cell comes from."""
        return _representative_cell(self.prototype, self.representative, self.species, volume_A3,
                                    "re-decorated framework", "with its orbits shared out anew")


def framework_orbits(proto: Prototype, representative: int = 0) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    """The orbits of a type's representative cell (site indices of each set of symmetry-equivalent sites, spglib
    at 0.1 angstrom as for the types, the sites told apart by their role) and the Wyckoff letter of each."""
    import spglib

    rep = proto.representatives[representative]
    quiet, os.environ["SPGLIB_WARNING"] = os.environ.get("SPGLIB_WARNING"), "OFF"  # no C-level chatter
    try:
        data = spglib.get_symmetry_dataset((np.asarray(rep["lattice"]), np.asarray(rep["frac"]),
                                            np.asarray(rep["roles"]) + 1), symprec=0.1)
    finally:
        if quiet is None:
            os.environ.pop("SPGLIB_WARNING", None)
        else:
            os.environ["SPGLIB_WARNING"] = quiet
    if data is None:  # spglib fails on a few odd cells: then every site is its own orbit
        return tuple((i,) for i in range(len(rep["roles"]))), ("?",) * len(rep["roles"])
    members: dict[int, list[int]] = defaultdict(list)
    for site, orbit in enumerate(data.equivalent_atoms):
        members[int(orbit)].append(site)
    orbits = tuple(tuple(v) for v in members.values())
    return orbits, tuple(data.wyckoffs[o[0]] for o in orbits)


def best_decorations(sizes: Sequence[int], cost: np.ndarray, counts: Sequence[int], k: int,
                     max_nodes: int = DECORATION_SEARCH_NODES) -> list[tuple[tuple[int, ...], float]]:
    """The ``k`` cheapest ways of giving each orbit (atoms ``sizes[o]``) one element (``cost[o, e]``) so that
    element ``e`` gets exactly ``counts[e]`` atoms: (element index of each orbit, total cost), cheapest first.
    Branch and bound over the orbits, largest first; the bound adds each remaining orbit's cheapest element.
    Hand-written: a small exact-cover search with counts has no library routine."""
    import heapq

    order = sorted(range(len(sizes)), key=lambda o: -sizes[o])
    floor = np.concatenate([np.cumsum([cost[o].min() for o in order][::-1])[::-1], [0.0]])
    best: list[tuple[float, tuple[int, ...]]] = []  # max-heap of the k best by negated cost
    remaining = list(counts)
    chosen = [0] * len(sizes)
    nodes = 0

    def search(depth: int, total: float) -> None:
        nonlocal nodes
        nodes += 1
        if nodes > max_nodes or (len(best) == k and total + floor[depth] >= -best[0][0]):
            return
        if depth == len(order):
            entry = (-total, tuple(chosen))
            heapq.heappush(best, entry) if len(best) < k else heapq.heappushpop(best, entry)
            return
        orbit = order[depth]
        for e in np.argsort(cost[orbit]):
            if remaining[e] >= sizes[orbit]:
                remaining[e] -= sizes[orbit]
                chosen[orbit] = int(e)
                search(depth + 1, total + float(cost[orbit, e]))
                remaining[e] += sizes[orbit]

    search(0, 0.0)
    return [(assignment, -negated) for negated, assignment in sorted(best, reverse=True)]


@lru_cache(maxsize=4)
def _types_by_size(library_name: str) -> tuple[dict[int, list[Prototype]], frozenset, dict]:
    """A library's types by atom count, its (space group, sorted roles) set, and a cache of framework orbits
    filled as they are needed, keyed by (id of type, representative): the types are held by this same cached
    entry, so their ids are not reused while it lives."""
    by_size: dict[int, list[Prototype]] = defaultdict(list)
    known = set()
    for protos in library(library_name).values():
        for proto in protos:
            by_size[proto.n_atoms].append(proto)
            known.add((proto.space_group, tuple(sorted(proto.roles))))
    return dict(by_size), frozenset(known), {}


@lru_cache(maxsize=64)
def redecorations(cell: Composition, leave_out_compound: bool = False, library_name: str = DEFAULT_LIBRARY
                  ) -> tuple[Decoration, ...]:
    """Candidates for ``cell`` from the library's frameworks of the same number of atoms, best prior first: each
    framework's orbits shared out among the cell's elements with the right atom counts (at most
    ``DECORATIONS_PER_FRAMEWORK`` per framework, the chemically closest), leaving out the ways that give a type
    the library holds (:func:`ranked_substitutions` has those). Log prior as for substitutions: log of the
    framework's member count minus ``CHEMISTRY_WEIGHT`` times the atom-weighted chemical distance of each
    orbit's new element to the closest element the members put there. ``leave_out_compound``: as for
    :func:`ranked_substitutions` (no cell or member of this very composition)."""
    elements = [el.symbol for el in cell]
    counts = [int(round(cell[el])) for el in cell]
    by_size, known, orbit_cache = _types_by_size(library_name)
    out = []
    for proto in by_size.get(sum(counts), []):
        members, reps = _usable(cell, proto, leave_out_compound)
        if not members or not reps:
            continue
        representative = reps[0]
        key = (id(proto), representative)
        if key not in orbit_cache:
            orbit_cache[key] = framework_orbits(proto, representative)
        orbits, letters = orbit_cache[key]
        roles = proto.representatives[representative]["roles"]
        sizes = [len(orbit) for orbit in orbits]
        # each orbit's cost of each element: distance to the closest element members put on its role
        cost = np.array([[min(element_distance(el, member[roles[orbit[0]]]) for member in members)
                          for el in elements] for orbit in orbits])
        cost *= np.array(sizes)[:, None] / sum(sizes)
        kept = 0
        for assignment, distance in best_decorations(sizes, cost, counts, DECORATIONS_PER_FRAMEWORK + 1):
            if kept == DECORATIONS_PER_FRAMEWORK:  # cheapest first: the rest are further away
                break
            new_roles = tuple(sorted((counts[e], "".join(sorted(w for w, a in zip(letters, assignment) if a == e)))
                                     for e in range(len(elements))))
            if (proto.space_group, new_roles) in known:  # the framework's own sharing, or another known type
                continue
            species = [""] * len(roles)
            for orbit, e in zip(orbits, assignment):
                for site in orbit:
                    species[site] = elements[e]
            out.append(Decoration(proto, representative, tuple(species),
                                  math.log(proto.count + 1.0) - CHEMISTRY_WEIGHT * distance))
            kept += 1
    out.sort(key=lambda d: -d.log_prior)
    return tuple(out)


def prototype_structures(cell: Composition, n: int, skip: int = 0, volume_A3: float | None = None,
                         leave_out_compound: bool = False, library_name: str = DEFAULT_LIBRARY,
                         redecorate: bool = True) -> list[Structure]:
    """Candidates ``skip`` to ``skip + n`` of :func:`ranked_substitutions`, then (``redecorate``) of
    :func:`redecorations` (fewer when both run out), scaled to ``volume_A3`` (angstrom^3; default the composition
    prior of the cell). An assignment that gives the
    same crystal as a better-ranked one of the same type (rock salt with Na and Cl swapped is rock salt shifted by
    half a cell; a second representative of a cubic type) is skipped (pymatgen StructureMatcher). Each carries
    its place in that list as ``properties["prior_rank"]`` (0 = likeliest), which the solver's ranking uses."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    volume = predicted_volume(cell) if volume_A3 is None else float(volume_A3)
    matcher = StructureMatcher()
    kept: dict[tuple, list[Structure]] = defaultdict(list)  # (source, type) -> its crystals drawn so far
    out: list[Structure] = []

    def ranked():  # the re-decorations are only searched for once the substitutions run out
        yield from ranked_substitutions(cell, leave_out_compound, library_name)
        if redecorate:
            yield from redecorations(cell, leave_out_compound, library_name)

    for candidate in ranked():
        if len(out) == skip + n:
            break
        structure = candidate.structure(volume)
        same_type = kept[(type(candidate), id(candidate.prototype))]
        if any(matcher.fit(structure, other) for other in same_type):
            continue
        same_type.append(structure)
        structure.properties["prior_rank"] = len(out)
        out.append(structure)
    return out[skip:]


def prototype_generator(fill=None, leave_out_compound: bool = False, library_name: str = DEFAULT_LIBRARY,
                        redecorate: bool = True):
    """A solver :data:`~xtalsolve.solve.Generator`: the best-ranked substitutions not yet drawn (``skip``) from
    the library ``library_name`` (:data:`LIBRARIES`), then (``redecorate``) its re-decorated frameworks, and,
    once those run out for the cell, candidates from ``fill`` (default random symmetric crystals,
    :func:`xtalsolve.symmetric.symmetric_generator`). ``leave_out_compound``: see :func:`ranked_substitutions`."""
    from xtalsolve.symmetric import symmetric_generator

    check_library(library_name)
    fill = fill or symmetric_generator()

    def generate(cell: Composition, n: int, seed: int, skip: int = 0) -> list[Structure]:
        drawn = prototype_structures(cell, skip + n, leave_out_compound=leave_out_compound,
                                     library_name=library_name, redecorate=redecorate)
        out = drawn[skip:]
        if len(out) < n:  # after every type of the library in the prior's order
            extra = list(fill(cell, n - len(out), seed, skip=max(0, skip - len(drawn))))
            for j, structure in enumerate(extra):
                structure.properties["prior_rank"] = skip + len(out) + j
            out += extra
        return out

    return generate
