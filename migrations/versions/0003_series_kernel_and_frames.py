"""series: convolution kernel and frame count (the per-study series rule)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 12:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('convolution_kernel', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('frame_count', sa.Integer(), server_default='0',
                                      nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('frame_count')
        batch_op.drop_column('convolution_kernel')
